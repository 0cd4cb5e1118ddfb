"""The engine's exported checkpoints load through the kernels runtime with the engine model's logits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels.modules import Sparse24Linear, W4A16Linear, W8A8Linear
from tests.kernels.helpers import assert_close
from tests.tiny import demo_tokenizer, tiny_llama

CASES = {"W4A16": W4A16Linear, "W8A8": W8A8Linear, "2:4+FP8_DYNAMIC": Sparse24Linear}
# W8A8 on the CPU runs torch's int8 weight-only matmul, which scales after accumulating (the engine's
# fake-quantized model scales the weight first). The ~1e-7 difference can move one activation across
# an int8 rounding boundary in the next layer's per-token quantization: one activation step, which a
# tiny random model carries to its logits as up to ~0.3% of the largest logit.
RTOL = {"W4A16": 1e-3, "W8A8": 5e-3, "2:4+FP8_DYNAMIC": 1e-3}


@pytest.mark.parametrize("preset", list(CASES))
def test_engine_checkpoint_round_trips_through_the_runtime(preset: str, tmp_path: Path) -> None:
    export = pytest.importorskip("compression.model_io.export")
    from compression.recipe import Recipe
    from compression.model_io.runtime import load_compressed_model
    from compression.sequential import compress_model

    model = tiny_llama(seed=4, vocab=512)
    recipe = Recipe.from_preset(preset)
    g = torch.Generator().manual_seed(4)
    calibration = [{"input_ids": torch.randint(3, 512, (1, 32), generator=g),
                    "attention_mask": torch.ones(1, 32, dtype=torch.long)} for _ in range(4)]
    report = compress_model(model, recipe, calibration)
    export.export_checkpoint(model, demo_tokenizer(), recipe, report, tmp_path / "ckpt")
    loaded = load_compressed_model(tmp_path / "ckpt")
    layers = [m for n, m in loaded.named_modules() if isinstance(m, CASES[preset])]
    assert len(layers) == 14
    ids = torch.randint(3, 512, (1, 9), generator=g)
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits, rtol=RTOL[preset], name=preset)
