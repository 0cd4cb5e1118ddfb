"""WikiText-2 perplexity on fixed, non-overlapping token windows.

The same windows are used for the dense and the compressed model, so the two numbers are
directly comparable. Token-level perplexity (exp of the mean next-token NLL) over the raw
test split, the convention of the GPTQ/SparseGPT papers.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch

from compression.errors import JobCancelled

log = logging.getLogger(__name__)

WIKITEXT_FILE = Path("wikitext2") / "wiki.test.raw"


def wikitext_windows(tokenizer, data_dir: str | Path | None, *, seqlen: int = 512,
                     max_windows: int | None = None) -> torch.Tensor:
    """Tokenize the raw WikiText-2 test split (the data directory's file, else the Hub's
    ``wikitext-2-raw-v1`` test split; see compression.data_sources) into [n, seqlen] windows."""
    from compression.data_sources import wikitext2_test_text

    text, where = wikitext2_test_text(data_dir)
    log.info("WikiText-2 test text from %s", where)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"WikiText-2 text is shorter than one window of {seqlen} tokens")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity_on_windows(model, windows: torch.Tensor, *, batch_size: int = 4,
                          should_stop: Callable[[], bool] | None = None) -> float:
    """exp(mean next-token NLL) of `model` over every window (each scored independently).

    `should_stop` is polled between batches so a cancelled job does not finish a long evaluation.
    """
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for start in range(0, windows.shape[0], batch_size):
        if should_stop is not None and should_stop():
            raise JobCancelled("cancelled during perplexity evaluation")
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    ppl = math.exp(total_nll / total_tokens)
    log.info("perplexity %.3f over %d windows", ppl, windows.shape[0])
    return ppl


def wikitext_perplexity(model, tokenizer, data_dir: str | Path, *, seqlen: int = 512,
                        max_windows: int | None = None, batch_size: int = 4,
                        should_stop: Callable[[], bool] | None = None) -> float:
    """WikiText-2 test perplexity of `model` on the first `max_windows` windows of `seqlen` tokens."""
    windows = wikitext_windows(tokenizer, data_dir, seqlen=seqlen, max_windows=max_windows)
    return perplexity_on_windows(model, windows, batch_size=batch_size, should_stop=should_stop)


PPL_CACHE_VERSION = "wikitext2_ppl-1"


def cached_wikitext_perplexity(model, tokenizer, data_dir: str | Path, *, seqlen: int, max_windows: int | None,
                               cache_dir: str | Path, model_identity: dict | str,
                               should_stop: Callable[[], bool] | None = None) -> tuple[float, bool]:
    """:func:`wikitext_perplexity` cached like the lm-eval baselines: one JSON entry per model
    identity (+ dtype), window size/count and the exact test text. Returns (perplexity, cache_hit)."""
    import hashlib
    import json

    from compression.data_sources import wikitext2_test_text
    from compression.evaluation.harness import _cache_read, _cache_write, _model_key

    text, _where = wikitext2_test_text(data_dir)
    parts = {"model": _model_key(model, model_identity), "task": "wikitext2_ppl", "seqlen": seqlen,
             "windows": max_windows, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
             "version": PPL_CACHE_VERSION}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
    cache = Path(cache_dir)
    hit = _cache_read(cache, key)
    if hit is not None and isinstance(hit.get("perplexity"), (int, float)):
        return float(hit["perplexity"]), True
    ppl = wikitext_perplexity(model, tokenizer, data_dir, seqlen=seqlen, max_windows=max_windows,
                              should_stop=should_stop)
    _cache_write(cache, key, parts, {"perplexity": ppl})
    return ppl, False
