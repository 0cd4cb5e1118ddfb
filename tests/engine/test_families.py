"""Every supported decoder family, dense and MoE: compress, export, load with transformers, count.

Tiny random models built from transformers' own config classes (tests/tiny.py: 2 layers, hidden
64, 4 experts). For each family and recipe the export must load in transformers (with
compressed-tensors) and through our runtime (compression/model_io/runtime.py, kernels/ modules), give our
fake-quantized model's logits, stay close to the dense model,
and hold every targeted weight in compressed form — counted against the weight names transformers
itself writes for the dense model (``save_pretrained``), so a weight the engine skipped (such as
fused MoE experts left 16-bit) is caught.
"""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compression.model_io.export import export_checkpoint
from compression.algorithms.quant import FP8_DTYPE
from kernels.packing import is_24_sparse, unpack_int4
from compression.recipe import Recipe
from compression.model_io.runtime import load_compressed_model
from compression.sequential import compress_model
from tests.engine.conftest import random_calibration, read_safetensors
from kernels.modules import Sparse24Linear, W4A16Linear, W8A8Linear
from tests.tiny import FAMILIES, MOE_FAMILIES, tiny_family_model

RECIPES = {"W4A16": {"group_size": 32}, "FP8_DYNAMIC": {}, "2:4+FP8_DYNAMIC": {}}
ROUTER_SUFFIXES = (".gate.weight", ".gate.e_score_correction_bias", ".shared_expert_gate.weight")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dense_layer_weights(model, tmp_path) -> set[str]:
    """Names (without .weight) of the 2-D Linear weights transformers writes for the decoder layers."""
    model.save_pretrained(tmp_path / "dense")
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), "pt") as f:
        keys = {k: f.get_slice(k).get_shape() for k in f.keys()}
    return {k.removesuffix(".weight") for k, shape in keys.items()
            if ".layers." in k and k.endswith(".weight") and len(shape) == 2 and not k.endswith(ROUTER_SUFFIXES)}


@pytest.mark.parametrize("preset", list(RECIPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_compresses_exports_and_loads_in_transformers(family, preset, tmp_path):
    model = tiny_family_model(family)
    expected = _dense_layer_weights(model, tmp_path)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = model(ids).logits
    recipe = Recipe.from_preset(preset, **RECIPES[preset])
    report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=256))
    with torch.no_grad():
        ours = model(ids).logits
    out = tmp_path / "export"
    export_checkpoint(model, None, recipe, report, out)

    tensors = read_safetensors(out)
    if preset == "W4A16":
        compressed = {k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")}
    else:
        compressed = {k.removesuffix(".weight") for k, t in tensors.items() if t.dtype == FP8_DTYPE}
    assert compressed == expected and set(report.modules) == expected
    for name in expected:
        assert f"{name}.weight_scale" in tensors
        if preset.startswith("2:4"):
            assert is_24_sparse(tensors[f"{name}.weight"]), name
    if preset == "W4A16":  # the packed codes are exactly what the in-memory model computes with
        name = sorted(expected)[-1]
        record = report.modules[name]
        assert torch.equal(unpack_int4(tensors[f"{name}.weight_packed"], record.shape[1]), record.codes)

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for router in report.routers:  # routers stay 16-bit and are named in ignore
        assert router in qc["ignore"] and tensors[f"{router}.weight"].dtype == torch.float32
    assert bool(report.routers) == (family in MOE_FAMILIES)

    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        theirs = loaded(ids).logits
    # transformers dequantizes fused MoE experts and runs them with 16-bit activations, so with
    # FP8 activations an MoE model differs from ours by the activation rounding in the experts
    tol = 1e-1 if family in MOE_FAMILIES and "FP8" in preset else 1e-4
    torch.testing.assert_close(theirs, ours, rtol=tol, atol=tol)

    runtime = load_compressed_model(out)  # our deployment path: every targeted Linear a kernels module
    kernel_modules = {n for n, m in runtime.named_modules() if isinstance(m, (W4A16Linear, W8A8Linear, Sparse24Linear))}
    assert len(kernel_modules) == len(expected)
    with torch.no_grad():
        torch.testing.assert_close(runtime(ids).logits, ours, rtol=2e-2, atol=2e-2)
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), dense.flatten(), dim=0)
    assert cosine > (0.5 if preset.startswith("2:4") else 0.9), float(cosine)  # random weights: 2:4 drops half
