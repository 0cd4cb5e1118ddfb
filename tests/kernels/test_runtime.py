"""load_compressed_model: every scheme gives the dequantized model's logits, through kernels modules."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from compression.model_io.runtime import CheckpointError, load_compressed_model
from kernels.modules import Sparse24Linear, W4A16Linear, W8A8Linear
from tests.kernels.checkpoints import SCHEMES, write_checkpoint
from tests.kernels.helpers import assert_close
from tests.tiny import tiny_llama, tiny_llama_config

VOCAB = 512
EXPECTED = {"FP8_DYNAMIC": (W8A8Linear, None), "FP8": (W8A8Linear, None), "W4A16": (W4A16Linear, None),
            "W4A16-channel": (W4A16Linear, None), "W8A8": (W8A8Linear, None), "2:4": (Sparse24Linear, "16bit"),
            "2:4+FP8_DYNAMIC": (Sparse24Linear, "fp8"), "2:4+W4A16": (Sparse24Linear, "int4")}


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, nn.Module]]:
    out = {}
    for scheme in SCHEMES:
        path = tmp_path_factory.mktemp(scheme.replace(":", "").replace("+", "_"))
        out[scheme] = (path, write_checkpoint(tiny_llama(seed=1, vocab=VOCAB), scheme, path))
    return out


def _assert_compressed(model: nn.Module, scheme: str) -> None:
    cls, kind = EXPECTED[scheme]
    layers = [m for n, m in model.named_modules() if n != "lm_head" and isinstance(m, (nn.Linear, cls))]
    assert len(layers) == 14 and all(isinstance(m, cls) for m in layers), scheme
    assert kind is None or all(m.value_kind == kind for m in layers)
    assert type(model.lm_head) is nn.Linear
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loaded_model_matches_the_dequantized_model(scheme: str, checkpoints) -> None:
    path, reference = checkpoints[scheme]
    model = load_compressed_model(path)
    _assert_compressed(model, scheme)
    assert not model.training
    with torch.no_grad():
        ref = reference(_ids()).logits
        out = model(_ids()).logits
    assert_close(out, ref, rtol=1e-4, name=scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loaded_model_runs_the_triton_kernels(scheme: str, checkpoints, device: str, triton_path) -> None:
    path, reference = checkpoints[scheme]
    model = load_compressed_model(path, device=device, dtype=torch.bfloat16)
    _assert_compressed(model, scheme)
    with torch.no_grad():
        ref = reference(_ids()).logits
        out = model(_ids().to(device)).logits.float().cpu()
    assert_close(out, ref, rtol=0.05, name=f"{scheme} bf16 triton")


def test_ignore_patterns_keep_modules_dense(tmp_path: Path) -> None:
    reference = write_checkpoint(tiny_llama(seed=2, vocab=VOCAB), "W4A16", tmp_path, ignore=("re:.*down_proj",))
    model = load_compressed_model(tmp_path)
    downs = [m for n, m in model.named_modules() if n.endswith("down_proj")]
    assert downs and all(type(m) is nn.Linear for m in downs)
    assert isinstance(model.model.layers[0].mlp.up_proj, W4A16Linear)
    with torch.no_grad():
        assert_close(model(_ids()).logits, reference(_ids()).logits, rtol=1e-4, name="ignore")


def test_tied_embeddings_are_tied(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(vocab=VOCAB)
    config.tie_word_embeddings = True
    torch.manual_seed(3)
    reference = write_checkpoint(LlamaForCausalLM(config).eval(), "FP8_DYNAMIC", tmp_path)
    model = load_compressed_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert_close(model(_ids()).logits, reference(_ids()).logits, rtol=1e-4, name="tied")


def test_transformers_reads_our_test_checkpoints_the_same_way(checkpoints) -> None:
    """The test writer follows the real format: transformers + compressed-tensors dequantize it alike."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    path, _ = checkpoints["W4A16"]
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_compressed_model(path)
    with torch.no_grad():
        assert_close(ours(_ids()).logits, theirs(_ids()).logits, rtol=1e-3, name="vs transformers")


def test_it_rejects_non_safetensors_weights(tmp_path: Path) -> None:
    tiny_llama(vocab=VOCAB).config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not used")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_compressed_model(tmp_path)
