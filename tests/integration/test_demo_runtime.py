"""The compressed runtime on the real demo model (SmolLM2-135M): same logits as the dequantized checkpoint.

Each case compresses the demo model with the engine (`compress_model`), exports a compressed-tensors
checkpoint (`export_checkpoint`) and loads it twice: with `compression.model_io.runtime.load_compressed_model`
(our `kernels` modules, holding only compressed buffers) and with transformers + compressed-tensors,
which dequantizes the same files to dense weights (and fake-quantizes activations for FP8) - the
"dequantized model", written by someone else. Both run on the CPU in float32.

Cost: the full-model comparisons use the kernels' torch reference path (on the CPU a launcher takes
Triton only when forced; thirty layers through the Triton interpreter would take minutes), and one
test pushes the real demo Linears of the first decoder layers (K = 576, not a multiple of 128, and
K = 1536) through the Triton kernels: on Triton's CPU interpreter without a GPU, on CUDA with one.
Recipes are picked for speed, not quality: round-to-nearest scales (no MSE search, no GPTQ) and
SparseGPT on one layer with four 32-token calibration samples. Scales only change the numbers in
the checkpoint, not its format or the runtime path being checked.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from compression.recipe import Recipe
from kernels.modules import CompressedLinear, Sparse24Linear, W4A16Linear, W8A8Linear
from tests.kernels.helpers import assert_close

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is Paris, and the capital of Germany is"
LINEARS_PER_LAYER = 7
LAYERS = 30

# FP8_DYNAMIC as the preset quantizes, but with min-max weight scales: the preset's MSE scale search
# takes about a minute on two cores and only picks other scale values (same format, same runtime path).
FP8_DYNAMIC = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
    "targets": ["Linear"], "ignore": ["lm_head"], "scheme": "FP8_DYNAMIC"}}}}
# Weight-only: SparseGPT 2:4 on decoder layer 0 (calibrated), then INT4 with group 64 on every Linear
# (group 128 does not divide 576). Layer 0 loads as Sparse24Linear[int4], the 29 others as W4A16Linear.
INT4_AND_24 = {
    "sparsity_stage": {"sparsity_modifiers": {"SparseGPTModifier": {
        "targets": [r"re:model\.layers\.0\."], "ignore": ["lm_head"], "sparsity": 0.5, "mask_structure": "2:4"}}},
    "quant_stage": {"quant_modifiers": {"QuantizationModifier": {
        "targets": ["Linear"], "ignore": ["lm_head"], "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}}}}},
}


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def demo():
    """The demo model exactly as a job loads it (GGUF dequantized to float32), its tokenizer, the prompt."""
    from compression.model_io.loading import load_model

    loaded = load_model("demo")
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        dense_logits = loaded.model(ids).logits
    return loaded, ids, dense_logits


def _export(demo, recipe_dict: dict, out: Path, calibration: list | None = None) -> Path:
    from compression.model_io.export import export_checkpoint
    from compression.sequential import compress_model

    loaded = demo[0]
    model = copy.deepcopy(loaded.model)
    recipe = Recipe.from_dict(recipe_dict)
    report = compress_model(model, recipe, calibration)
    export_checkpoint(model, None, recipe, report, out)
    return out


def _load_both(path: Path) -> tuple[nn.Module, nn.Module]:
    """(our runtime model, the transformers + compressed-tensors dequantized model) of one checkpoint."""
    from transformers import AutoModelForCausalLM

    from compression.model_io.runtime import load_compressed_model

    runtime = load_compressed_model(path)
    dequantized = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return runtime, dequantized


@pytest.fixture(scope="module")
def fp8(demo, tmp_path_factory):
    return _load_both(_export(demo, FP8_DYNAMIC, tmp_path_factory.mktemp("fp8") / "ckpt"))


@pytest.fixture(scope="module")
def int4_24(demo, tmp_path_factory):
    from django.conf import settings

    from compression.calibration import load_calibration

    calibration = load_calibration("calibration/self_instruct_seed_tasks.jsonl", demo[0].tokenizer, samples=4,
                                   seqlen=32, data_dir=settings.COMPRESSOR_DATA_DIR)
    return _load_both(_export(demo, INT4_AND_24, tmp_path_factory.mktemp("int4") / "ckpt", calibration))


def _assert_compressed(runtime: nn.Module, expected: dict[str, type]) -> None:
    """Every decoder Linear is the expected kernels module and holds no dense 16/32-bit weight."""
    layers = {n: m for n, m in runtime.named_modules() if isinstance(m, (nn.Linear, CompressedLinear))}
    assert type(layers.pop("lm_head")) is nn.Linear  # ignored, tied to the embedding
    assert len(layers) == LAYERS * LINEARS_PER_LAYER
    for name, module in layers.items():
        cls = next(c for prefix, c in expected.items() if name.startswith(prefix))
        assert type(module) is cls, (name, type(module))
        n, k = module.out_features, module.in_features
        # scales are at most one per 32 weights; anything bigger in 16/32-bit would be a dense copy
        dense = [t for t in module.state_dict().values()
                 if t.dtype in (torch.float32, torch.float16, torch.bfloat16) and t.numel() > n * k // 32]
        assert not dense, f"{name} holds a dense float tensor {[tuple(t.shape) for t in dense]}"
        stored = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        assert stored <= n * k * 1.1, f"{name}: {stored} bytes for {n}x{k} weights"  # ≤ ~1 byte per weight
    assert not any(p.is_meta for p in runtime.parameters())


def test_fp8_dynamic_runtime_matches_the_dequantized_model(demo, fp8) -> None:
    """FP8 weights and per-token FP8 activations: every Linear matches; the logits only roughly (see below)."""
    _, ids, dense_logits = demo
    runtime, dequantized = fp8
    _assert_compressed(runtime, {"model.layers.": W8A8Linear})

    # Each of the 210 Linears gets the input the dequantized model gives it on the prompt. Same input,
    # so both sides round it to the same FP8 codes; what remains is fp32 summation order, ~1e-6 of the
    # output. 1e-4 of max |out| is far below any layout or scale mistake (a wrong code alone is up to
    # 1/16 of a value; a wrong scale or transposed tile is O(1)).
    mismatches, checked, worst = [], [], 0.0
    hooks = []
    for name, module in dequantized.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            ours = runtime.get_submodule(name)

            def check(mod, args, out, ours=ours, name=name):
                nonlocal worst
                mine = ours(args[0])
                err = (mine - out).abs().max().item() / out.abs().max().item()
                worst = max(worst, err)
                checked.append(name)
                if not (torch.isfinite(mine).all() and err <= 1e-4):
                    mismatches.append((name, err))

            hooks.append(module.register_forward_hook(check))
    with torch.no_grad():
        reference = dequantized(ids).logits
        for hook in hooks:
            hook.remove()
        logits = runtime(ids).logits
    assert len(checked) == LAYERS * LINEARS_PER_LAYER  # compressed-tensors decompresses in place: hooks fire
    assert not mismatches, f"Linears off by more than 1e-4 of max |out|: {mismatches[:5]} (worst {worst:.2g})"

    # End to end, the FP8 model is not defined to better than ~10 % of its logits: per-token dynamic
    # FP8 rounding is a step function, a 1e-7 difference moves an activation across a rounding edge
    # now and then, and SmolLM2's massive activations (|h| ~ 2.4e4 in the residual stream from layer
    # 11 on) carry one such flip to the logits. Measured on this prompt: the dequantized model in float32
    # vs itself in float64 differs by 10 % RMS (2.9 of max 29); runtime vs dequantized by 16 % RMS
    # (4.2). So the end-to-end bound is loose (30 % RMS) and only catches a broken model (RMS ≥ 100 %);
    # the per-Linear check above is the tight one.
    assert torch.isfinite(logits).all() and torch.isfinite(reference).all()
    rms = ((logits - reference).norm() / reference.norm()).item()
    assert rms <= 0.30, f"runtime vs dequantized logits: {rms:.1%} RMS"
    assert (dense_logits - reference).abs().max() > 0.1  # the reference really is the quantized model


def test_int4_and_24_runtime_gives_the_dequantized_logits(demo, int4_24) -> None:
    """Weight-only INT4 (29 layers) and 2:4 INT4 (layer 0): full-model logits match tightly."""
    _, ids, dense_logits = demo
    runtime, dequantized = int4_24
    _assert_compressed(runtime, {"model.layers.0.": Sparse24Linear, "model.layers.": W4A16Linear})
    assert all(m.value_kind == "int4" for m in runtime.model.layers[0].modules() if isinstance(m, Sparse24Linear))
    with torch.no_grad():
        reference = dequantized(ids).logits
        logits = runtime(ids).logits
    # Weight-only: both sides multiply the float32 activations by the same dequantized fp32 weights
    # (codes x scale; unpacking and 2:4 decompression are exact), so only fp32 summation order can
    # differ (about 1e-7 relative per GEMM), and without activation quantization the network is
    # continuous, so thirty layers grow that to well under 1e-5. Bound: 1e-4 of max |logit| (~3e-3).
    # A wrong nibble, group or 2:4 position changes logits by > 0.1 (the INT4 error itself is > 1).
    assert_close(logits, reference, rtol=1e-4, name="INT4 + 2:4 runtime vs dequantized")
    assert (dense_logits - reference).abs().max() > 0.1  # the reference really is the quantized model


def _layer_inputs(runtime: nn.Module, ids: torch.Tensor, names: list[str], stop_layer: int) -> dict[str, torch.Tensor]:
    """The inputs the runtime's own forward gives these Linears (stopped before decoder layer stop_layer)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [runtime.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: inputs.__setitem__(n, args[0].detach())) for n in names]

    def stop(mod, args):
        raise _Stop

    hooks.append(runtime.model.layers[stop_layer].register_forward_pre_hook(stop))
    try:
        with torch.no_grad():
            runtime(ids)
    except _Stop:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


@pytest.mark.parametrize("case", ["fp8", "int4_24"])
def test_real_demo_layers_give_the_same_output_through_triton(case: str, demo, request) -> None:
    """Real demo Linears (K = 576 and 1536) through the Triton kernels vs the torch reference path.

    FP8: the attention projections and down_proj of layer 0 (skipping gate/up, 1536 outputs each, to save
    interpreter time). INT4: layer 0's q_proj (2:4 INT4, K = 576) and layer 1's down_proj (W4A16 group 64,
    K = 1536): each format and each width once (the interpreter costs ~7 s per module).
    """
    from kernels._dispatch import force_triton

    runtime, _ = request.getfixturevalue(case)
    if case == "fp8":
        names = [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                 "self_attn.o_proj", "mlp.down_proj")]
    else:
        names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    inputs = _layer_inputs(runtime, demo[1], names, stop_layer=2)
    cuda = torch.cuda.is_available()
    for name in names:
        module, x = runtime.get_submodule(name), inputs[name]
        with torch.no_grad():
            expected = module(x)
            if cuda:  # the real kernels (CUDA tensors take Triton); fp32 tl.dot runs as tf32 there
                got = copy.deepcopy(module).cuda()(x.cuda()).cpu()
            else:  # Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)
                with force_triton():
                    got = module(x)
        # The kernels accumulate in fp32 like the reference (FP8 activation codes are bit-exact by
        # design), so the interpreter differs by ~1e-7 relative; 1e-4 of max |out| leaves room for order.
        assert_close(got, expected, rtol=2e-2 if cuda else 1e-4, name=f"{case} {name} ({tuple(x.shape)} @ "
                     f"{module.in_features}->{module.out_features})")
