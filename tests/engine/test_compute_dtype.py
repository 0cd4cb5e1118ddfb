"""A 16-bit model on a CPU worker is compressed one float32 layer at a time, and stays 16-bit."""
import pytest
import torch

from compression.algorithms.quant import QuantArgs, dequantize
from compression.recipe import Recipe
from compression.sequential import compress_model, compute_dtype
from tests.engine.conftest import random_calibration
from tests.tiny import tiny_llama


@pytest.fixture
def cpu_without_native_half(monkeypatch):
    monkeypatch.setattr("compression.sequential.cpu_has_native", lambda dtype: False)


def test_a_cpu_with_native_bf16_keeps_the_model_dtype(monkeypatch):
    monkeypatch.setattr("compression.sequential.cpu_has_native", lambda dtype: dtype is torch.bfloat16)
    assert compute_dtype(tiny_llama(dtype=torch.bfloat16), "cpu") is None
    assert compute_dtype(tiny_llama(dtype=torch.float16), "cpu") is torch.float32


def test_compute_dtype_widens_only_half_precision_on_the_cpu(cpu_without_native_half):
    assert compute_dtype(tiny_llama(dtype=torch.bfloat16), "cpu") is torch.float32
    assert compute_dtype(tiny_llama(dtype=torch.float16), "cpu") is torch.float32
    assert compute_dtype(tiny_llama(), "cpu") is None
    assert compute_dtype(tiny_llama(dtype=torch.bfloat16), "cuda") is None


@pytest.mark.parametrize("preset", ["W4A16", "2:4"])
def test_bf16_model_is_calibrated_in_float32_and_stored_in_bf16(preset, cpu_without_native_half):
    calibration = random_calibration(n=4, length=16, vocab=2048)
    model = tiny_llama(dtype=torch.bfloat16)
    wide = tiny_llama(dtype=torch.bfloat16).float()  # the same bf16 weights, widened up front
    recipe = Recipe.from_preset(preset, group_size=32) if preset == "W4A16" else Recipe.from_preset(preset)
    report = compress_model(model, recipe, calibration)
    reference = compress_model(wide, recipe, calibration)

    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # host memory of the 16-bit model
    for name, record in report.modules.items():
        weight = model.get_submodule(name).weight.data
        if record.codes is not None:
            assert record.scale.dtype is torch.bfloat16  # scales as the checkpoint stores them
            args = QuantArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
            # the model holds exactly what the checkpoint's codes and scales decode to
            assert torch.equal(dequantize(record.codes, record.scale, torch.bfloat16, args=args,
                                          zero_point=record.zero_point), weight)
        ref = reference.modules[name]
        # the same algorithm on the same (bf16) weights as the widened model; only the scales differ,
        # rounded to bf16 here (the refitted GPTQ scales lose a few percent of their gain to that)
        assert record.losses.keys() == ref.losses.keys()
        for kind, loss in record.losses.items():
            assert loss == pytest.approx(ref.losses[kind], rel=0.1, abs=1e-6)
