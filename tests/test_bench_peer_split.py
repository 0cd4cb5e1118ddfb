"""bench/peer.py's held-out protocol: calibration chunks and evaluation windows from disjoint whole articles."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


class WordTokenizer:
    """One id per whitespace-separated word (enough to check how articles are cut)."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return {"input_ids": torch.tensor([[len(w) for w in text.split()]], dtype=torch.long)}


def test_calibration_takes_the_first_whole_articles_and_evaluation_the_rest():
    import peer

    articles = peer._articles()
    tok = WordTokenizer()
    split = peer.article_split(tok, samples=16, seqlen=64)
    lengths = [len(a.split()) for a in articles]
    # the fewest leading articles whose words reach 16 x 64
    k = next(i + 1 for i in range(len(lengths)) if sum(lengths[: i + 1]) >= 16 * 64)
    assert split.calibration_articles == k and split.evaluation_articles == len(articles) - k
    assert split.calibration.shape == (16, 64)
    assert split.evaluation.shape == ((sum(lengths[k:]) // 64), 64)
    first = torch.tensor([len(w) for w in articles[k].split()][:64])
    assert torch.equal(split.evaluation[0], first)  # evaluation starts at the first held-out article
    samples = peer.calibration_samples(split)
    assert len(samples) == 16 and samples[0]["input_ids"].shape == (1, 64)
    assert bool(samples[0]["attention_mask"].all())


def test_too_much_calibration_is_refused():
    import peer

    with pytest.raises(ValueError, match="too few tokens"):
        peer.article_split(WordTokenizer(), samples=10_000, seqlen=512)
