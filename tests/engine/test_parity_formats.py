"""llm-compressor parity: zero points, act-order groups, MSE search range, FP8 blocks, NVFP4, KV-cache
scales — checked against compressed-tensors' own arithmetic and decompressors where it has them."""
import json

import pytest
import torch

from compression.model_io.export import export_checkpoint
from compression.algorithms.gptq import HessianAccumulator, gptq_quantize, quantize_weight
from compression.algorithms.quant import (FP8_DTYPE, QuantArgs, compute_qparams, fake_quantize, fp4_global_scale, minmax_scale,
                               pack_fp4, qparams_from_range, unpack_fp4)
from compression.recipe import Recipe
from compression.model_io.runtime import DequantLinear, load_compressed_model
from compression.sequential import compress_model
from tests.engine.conftest import correlated_inputs, random_calibration
from tests.tiny import demo_tokenizer, tiny_llama

ASYM_G32 = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)


def _ct_args(**kw):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**kw)


def test_asymmetric_qparams_equal_compressed_tensors_calculate_qparams():
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(16, 128) + 0.7  # skewed: an asymmetric range pays off
    lo = w.reshape(16, 4, 32).amin(dim=2)
    hi = w.reshape(16, 4, 32).amax(dim=2)
    ours_s, ours_zp = qparams_from_range(lo, hi, ASYM_G32, torch.float32)
    theirs_s, theirs_zp = calculate_qparams(lo, hi, _ct_args(num_bits=4, symmetric=False, strategy="group",
                                                               group_size=32))
    torch.testing.assert_close(ours_s, theirs_s)
    assert ours_zp.dtype == torch.int8 and torch.equal(ours_zp, theirs_zp.to(torch.int8))
    # and fake quantization agrees with theirs bit for bit
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize

    ours = fake_quantize(w, ours_s, ASYM_G32, zero_point=ours_zp)
    theirs = ct_fake_quantize(w, theirs_s, theirs_zp, _ct_args(num_bits=4, symmetric=False, strategy="group",
                                                                 group_size=32))
    torch.testing.assert_close(ours, theirs)
    sym = QuantArgs(num_bits=4, strategy="group", group_size=32)
    assert (ours - w).pow(2).sum() < (fake_quantize(w, minmax_scale(w, sym), sym) - w).pow(2).sum()


def test_mse_observer_searches_llm_compressors_range_by_default():
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((32, 1024))  # heavy tails: the best clip is far below 0.8
    args = QuantArgs(num_bits=4, strategy="channel", observer="mse")
    ratio = compute_qparams(w, args)[0] / minmax_scale(w, QuantArgs(num_bits=4, strategy="channel"))
    assert float(ratio.min()) >= 0.81 - 1e-6 and float(ratio.max()) <= 1.0 + 1e-6  # maxshrink 0.2, grid 100
    wide = QuantArgs(num_bits=4, strategy="channel", observer="mse",
                     observer_kwargs={"maxshrink": 0.8, "grid": 20, "patience": 100})
    assert float((compute_qparams(w, wide)[0] / minmax_scale(w, QuantArgs(num_bits=4, strategy="channel"))).min()
                 ) < 0.8


@pytest.mark.parametrize("actorder", [None, "static", "group"])
def test_gptq_with_zero_points_beats_round_to_nearest(actorder):
    x = correlated_inputs(cols=128)
    acc = HessianAccumulator(128)
    acc.add(x)
    w = torch.randn(48, 128) * 0.1 + 0.05
    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32, actorder=actorder)
    res = gptq_quantize(w, acc.hessian, args, block_size=32, actorder=actorder)
    rtn = quantize_weight(w, args, torch.float32).weight
    err = lambda deq: float(((deq - w) @ x.T).pow(2).sum())  # noqa: E731
    assert err(res.weight) < err(rtn)
    assert res.zero_point.shape == res.scale.shape == (48, 4) and res.zero_point.dtype == torch.int8
    assert int(res.codes.min()) >= -8 and int(res.codes.max()) <= 7
    if actorder == "group":
        # every group holds group_size columns, visited in decreasing diag(H) order
        assert res.g_idx.shape == (128,) and torch.bincount(res.g_idx.long()).tolist() == [32] * 4
        order = torch.argsort(torch.diag(acc.hessian), descending=True)
        assert res.g_idx[order[:32]].unique().tolist() == [0]
        deq = (res.codes.float() - res.zero_point.float()[:, res.g_idx.long()]) * res.scale[:, res.g_idx.long()]
    else:
        assert res.g_idx is None
        deq = (res.codes.float() - res.zero_point.float().repeat_interleave(32, 1)) * res.scale.repeat_interleave(32, 1)
    torch.testing.assert_close(deq, res.weight)


def test_fp8_block_and_nvfp4_match_compressed_tensors_fake_quantization():
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize

    w = torch.randn(200, 160)  # not a multiple of the 128x128 block: padded blocks like compressed-tensors
    block = QuantArgs(num_bits=8, type="float", strategy="block", block_structure=(128, 128))
    s, _ = compute_qparams(w, block, torch.float32)
    assert s.shape == (2, 2)
    theirs = ct_fake_quantize(w, s, None, _ct_args(num_bits=8, type="float", strategy="block",
                                                    block_structure=[128, 128]))
    torch.testing.assert_close(fake_quantize(w, s, block), theirs)

    nv = QuantArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, scale_dtype="float8_e4m3fn")
    g = fp4_global_scale(w)
    s, _ = compute_qparams(w, nv, torch.float32, global_scale=g)
    assert s.dtype == FP8_DTYPE and s.shape == (200, 10)
    ours = fake_quantize(w, s, nv, global_scale=g)
    theirs = ct_fake_quantize(w, s.float(), None, _ct_args(num_bits=4, type="float", strategy="tensor_group",
                                                            group_size=16), global_scale=g)
    torch.testing.assert_close(ours, theirs)
    codes = torch.tensor([[0.0, -0.5, 1.5, -6.0, 3.0, 4.0]])
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    assert torch.equal(pack_fp4(codes), pack_fp4_to_uint8(codes))


def _export(preset_or_yaml, tmp_path, **options):
    model = tiny_llama(vocab=2048)
    recipe = (Recipe.from_yaml(preset_or_yaml) if ":" in preset_or_yaml and "\n" in preset_or_yaml
              else Recipe.from_preset(preset_or_yaml, **options))
    report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=2048))
    ids = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids).logits
    export_checkpoint(model, demo_tokenizer(), recipe, report, tmp_path)
    return model, ids, ours, report


def test_asymmetric_checkpoint_decompresses_with_compressed_tensors_and_loads_in_our_runtime(tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    model, ids, ours, _ = _export("W4A16_ASYM", tmp_path, group_size=32)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert w["symmetric"] is False and w["zp_dtype"] == "torch.int8" and w["actorder"] == "static"
    tensors = {}
    for f in tmp_path.glob("*.safetensors"):
        tensors.update(load_file(f))
    scheme = QuantizationScheme(targets=["Linear"], weights=_ct_args(**{k: v for k, v in w.items()}))
    p = "model.layers.1.mlp.down_proj"
    local = {k.removeprefix(p + "."): v for k, v in tensors.items() if k.startswith(p + ".")}
    assert local["weight_zero_point"].shape == (16, 8) and "weight_g_idx" not in local
    theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    torch.testing.assert_close(theirs.float(), model.model.layers[1].mlp.down_proj.weight, rtol=0, atol=1e-6)

    loaded = load_compressed_model(tmp_path)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, DequantLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["FP8_BLOCK", "NVFP4", "NVFP4A16", "FP8+KV_FP8"])
def test_new_formats_load_in_our_runtime_with_the_same_logits(preset, tmp_path):
    _, ids, ours, report = _export(preset, tmp_path)
    loaded = load_compressed_model(tmp_path)
    with torch.no_grad():  # FP8 static runs through the W8A8 kernel module (fp32 accumulation order differs)
        tol = 1e-3 if preset == "FP8+KV_FP8" else 1e-4
        torch.testing.assert_close(loaded(ids).logits, ours, rtol=tol, atol=tol)
    if preset == "FP8+KV_FP8":
        assert set(report.kv_scales) == {f"model.layers.{i}.self_attn.{k}_scale" for i in (0, 1) for k in "kv"}


def test_kv_cache_scales_are_absmax_of_the_keys_after_rope_over_448():
    model = tiny_llama(vocab=2048)
    calib = random_calibration(n=3, length=16, vocab=2048)
    seen = {}
    attn = model.model.layers[0].self_attn
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb

    def spy(q, k, cos, sin, *a, **kw):  # the keys the cache would receive
        q2, k2 = original(q, k, cos, sin, *a, **kw)
        seen["k"] = max(seen.get("k", 0.0), float(k2.abs().amax()))
        return q2, k2

    handle = attn.v_proj.register_forward_hook(
        lambda m, i, o: seen.__setitem__("v", max(seen.get("v", 0.0), float(o.abs().amax()))))
    modeling_llama.apply_rotary_pos_emb = spy
    try:
        with torch.no_grad():
            for s in calib:
                model.model.layers[0].self_attn.layer_idx  # noqa: B018
                model(**s)
    finally:
        modeling_llama.apply_rotary_pos_emb = original
        handle.remove()
    recipe = Recipe.from_yaml("q:\n  q_modifiers:\n    QuantizationModifier:\n      kv_cache_scheme: "
                              "{num_bits: 8, type: float, strategy: tensor, dynamic: false, symmetric: true}\n")
    report = compress_model(model, recipe, calib)
    k = float(report.kv_scales["model.layers.0.self_attn.k_scale"])
    v = float(report.kv_scales["model.layers.0.self_attn.v_scale"])
    assert k == pytest.approx(seen["k"] / 448, rel=1e-5) and v == pytest.approx(seen["v"] / 448, rel=1e-5)
    assert not report.modules  # a KV-cache-only recipe quantizes no weights


def test_gptq_reuses_the_preceding_quantization_modifiers_scheme():
    text = """
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 64, observer: mse}
    GPTQModifier: {block_size: 64, dampening_frac: 0.02}
"""
    recipe = Recipe.from_yaml(text)
    gptq = recipe.modifiers[1]
    assert gptq.inherits_scheme and gptq.config_groups["group_0"].weights.symmetric is False
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    model = tiny_llama(vocab=2048)
    report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=2048))
    record = report.modules["model.layers.0.mlp.down_proj"]
    assert set(record.losses) == {"gptq"} and record.zero_point is not None  # solved once, by GPTQ


def test_preserve_sparsity_mask_keeps_existing_zeros():
    model = tiny_llama(vocab=2048)
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight[:, ::4] = 0.0  # an existing 25% pattern (one per group of four)
    before = down.weight == 0
    text = ("s:\n  s_modifiers:\n    SparseGPTModifier: {sparsity: 0.5, mask_structure: '2:4', "
            "preserve_sparsity_mask: %s}\n")
    compress_model(model, Recipe.from_yaml(text % "true"), random_calibration(n=4, length=16, vocab=2048))
    assert bool((down.weight[before] == 0).all())
    assert Recipe.from_yaml(text % "true").modifiers[0].preserve_sparsity_mask


@pytest.mark.parametrize("body,field,hint", [
    ("QuantizationModifier: {scheme: W4A16, kv_cache_scheme: {num_bits: 8, type: float, strategy: channel}}",
     "stages[0].modifiers[0].kv_cache_scheme.strategy", "per-tensor"),
    ("QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 4, type: float, "
     "strategy: tensor_group, group_size: 32}}}}", "stages[0].modifiers[0].config_groups.g.weights.group_size", "16"),
    ("QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 8, scale_dtype: int4}}}}",
     "stages[0].modifiers[0].config_groups.g.weights.scale_dtype", "float8_e4m3fn"),
    ("QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 8, observer: imatrix}}}}",
     "stages[0].modifiers[0].config_groups.g.weights.observer", "mse"),
    ("QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 8, observer: mse, "
     "observer_kwargs: {shrink: 2}}}}}", "stages[0].modifiers[0].config_groups.g.weights.observer_kwargs.shrink",
     "maxshrink"),
    ("GPTQModifier: {scheme: W4A16, sequential_targets: [MyBlock]}", "stages[0].modifiers[0].sequential_targets",
     "LlamaDecoderLayer"),
    ("GPTQModifier: {actorder: weight}", "stages[0].modifiers[0]", "preceding QuantizationModifier"),
    ("GPTQModifier: {scheme: W4A16, actorder: sideways}", "stages[0].modifiers[0].actorder", "weight"),
    ("AWQModifier: {duo_scaling: maybe}", "stages[0].modifiers[0].duo_scaling", "both"),
])
def test_options_the_engine_cannot_honour_are_refused_with_the_field(body, field, hint):
    from compression.errors import RecipeError

    with pytest.raises(RecipeError) as exc:
        Recipe.from_yaml(f"q:\n  q_modifiers:\n    {body}\n")
    assert exc.value.field == field and hint in exc.value.message


def test_llm_compressor_style_options_are_accepted():
    text = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      targets: Linear
      ignore: [lm_head]
      scheme: W4A16_ASYM
      actorder: weight
      sequential_targets: [LlamaDecoderLayer]
      offload_hessians: false
      weight_observer: mse
      kv_cache_scheme: {num_bits: 8, type: float, strategy: tensor, dynamic: false, symmetric: true}
"""
    recipe = Recipe.from_yaml(text)
    w = recipe.modifiers[0].config_groups["group_0"].weights
    assert (w.symmetric, w.observer, w.actorder) == (False, "mse", "static")
    assert recipe.kv_cache is not None and recipe.needs_calibration
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    nv = Recipe.from_yaml("q:\n  q_modifiers:\n    QuantizationModifier: {scheme: NVFP4, ignore: [lm_head]}\n")
    g = nv.modifiers[0].config_groups["group_0"]
    assert g.weights.is_fp4 and g.weights.scale_dtype == "float8_e4m3fn" and g.input_activations.dynamic == "local"


def test_actorder_group_runs_as_weight_ordering_and_says_so():
    recipe = Recipe.from_yaml("q:\n  q_modifiers:\n    GPTQModifier: {scheme: W4A16, actorder: group}\n")
    assert recipe.modifiers[0].config_groups["group_0"].weights.actorder == "static"
    assert "compressed-tensors 0.20 removed" in recipe.describe()
    assert "removed" not in Recipe.from_yaml("q:\n  q_modifiers:\n    GPTQModifier: {scheme: W4A16}\n").describe()


def _layer_logits_error(model, reference, calib):
    with torch.no_grad():
        return sum(float((model(**s).logits - reference(**s).logits).pow(2).mean()) for s in calib)


def test_smoothquant_folding_keeps_the_float_model_and_flattens_activations():
    from compression.sequential import CompressionReport
    from compression.algorithms.smoothing import smooth_layer
    from compression.model_io.walk import capture_layer_inputs

    model = tiny_llama(vocab=2048)
    reference = tiny_llama(vocab=2048)
    with torch.no_grad():  # an outlier channel, as real LLM activations have
        for m in (model, reference):
            m.model.layers[0].input_layernorm.weight[5] = 25.0
    calib = random_calibration(n=3, length=16, vocab=2048)
    recipe = Recipe.from_yaml("s:\n  s_modifiers:\n    SmoothQuantModifier:\n      smoothing_strength: 0.8\n"
                              "      mappings: [[['re:.*q_proj', 're:.*k_proj', 're:.*v_proj'], 're:.*input_layernorm']]\n"
                              "q:\n  q_modifiers:\n    GPTQModifier: {scheme: W8A8}\n")
    layer = model.model.layers[0]
    inputs = capture_layer_inputs(model, list(model.model.layers), calib, "cpu")
    report, events = CompressionReport(), []
    smooth_layer(recipe, "model.layers.0", layer, inputs, report, events.append, 0, 2)
    assert len(report.smoothing) == 1 and report.smoothing[0]["smooth_layer"] == "model.layers.0.input_layernorm"
    assert events and events[0]["module"] == "input_layernorm"
    assert _layer_logits_error(model, reference, calib) < 1e-8  # the float function is unchanged
    w = layer.input_layernorm.weight
    assert float(w.abs().max() / w.abs().min()) < float(25.0 / reference.model.layers[0].input_layernorm.weight.abs()
                                                          .min())


def test_awq_search_never_loses_to_plain_rounding_and_the_pipeline_runs_it():
    from compression.algorithms.awq import awq_search

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(256, 64) * torch.linspace(0.1, 8.0, 64)  # uneven channels
    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=16)
    res = awq_search(x.abs().mean(0), [lin], [args], lambda: [lin(x)], n_grid=20, duo_scaling=True)
    assert res.best_error <= res.initial_error and res.scales.shape == (64,)
    assert res.initial_error > 0 and torch.equal(lin.weight, lin.weight)  # weights restored

    float_model = tiny_llama(vocab=2048)
    calib = random_calibration(n=4, length=16, vocab=2048)
    errors = {}
    for name in ("AWQ+W4A16_ASYM", "W4A16_ASYM"):
        model = tiny_llama(vocab=2048)
        recipe = Recipe.from_preset(name, group_size=32) if name.startswith("AWQ") else Recipe.from_yaml(
            "q:\n  q_modifiers:\n    QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: "
            "{num_bits: 4, symmetric: false, strategy: group, group_size: 32}}}}\n")
        events = []
        report = compress_model(model, recipe, calib, progress=events.append)
        if name.startswith("AWQ"):
            # q/k/v, gate/up and up→down per layer (v→o skipped: grouped-query attention shapes)
            assert len(report.smoothing) == 6 and all(s["best_error"] <= s["initial_error"] for s in report.smoothing)
            assert any(e.get("message", "").startswith("AWQ input_layernorm") for e in events)
        errors[name] = _layer_logits_error(model, float_model, calib)
    assert errors["AWQ+W4A16_ASYM"] < errors["W4A16_ASYM"] * 1.05


@pytest.mark.parametrize("preset,field", [("FP8_BLOCK", "recipe.input_activations.group_size")])
def test_preflight_refuses_shapes_the_format_cannot_tile(preset, field):
    from compression.errors import RecipeError
    from compression.preflight import preflight

    smollm = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
              "num_hidden_layers": 30, "vocab_size": 49152, "model_type": "llama"}
    with pytest.raises(RecipeError) as exc:
        preflight(smollm, Recipe.from_preset(preset))
    assert exc.value.field == field and "576" in exc.value.message
    nv = dict(smollm, hidden_size=600, intermediate_size=1600, num_attention_heads=10, num_key_value_heads=5)
    with pytest.raises(RecipeError) as exc:  # 600 = 37.5 groups of 16
        preflight(nv, Recipe.from_preset("NVFP4"))
    assert exc.value.field == "recipe.group_size" and "NVFP4" in exc.value.message
    preflight(smollm, Recipe.from_preset("NVFP4"))  # 576 and 1536 are multiples of 16
    with pytest.raises(RecipeError) as exc:
        preflight(dict(smollm, model_type="mamba"), Recipe.from_preset("FP8+KV_FP8"))
    assert exc.value.field == "recipe.kv_cache_scheme"


@pytest.mark.parametrize("scheme", [
    dict(num_bits=8, type="float", strategy="channel"),
    dict(num_bits=8, type="float", strategy="tensor"),
    dict(num_bits=4, type="int", strategy="group", group_size=32),
    dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
    dict(num_bits=8, type="int", strategy="channel"),
])
def test_round_to_nearest_codes_equal_compressed_tensors_on_bf16_weights(scheme):
    """RTN of a bf16 weight divides in bf16 as compressed-tensors does (w / scale with torch's type
    promotion, zero point added in bf16), so a data-free checkpoint holds exactly llm-compressor's codes.
    Dividing in float32 instead changes a few percent of FP8 codes by one step."""
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

    torch.manual_seed(3)
    w = (torch.randn(64, 256) * 0.05 + 0.01).to(torch.bfloat16)
    ours_args = QuantArgs(**{"symmetric": True, **scheme})
    result = quantize_weight(w, ours_args, torch.bfloat16)
    ct_args = _ct_args(**{"symmetric": True, **scheme})
    zp = result.zero_point if result.zero_point is not None else torch.zeros_like(result.scale)
    theirs = ct_quantize(w, result.scale, zp, ct_args)
    ours = result.codes.float() if result.codes.dtype == FP8_DTYPE else result.codes
    assert torch.equal(ours.float(), theirs.float()), float((ours.float() != theirs.float()).float().mean())
    if scheme["type"] == "float":  # the float32 division really differs on some codes (the test can fail)
        s = result.scale.float()
        f32 = torch.clamp(w.float() / (s if s.dim() else s.reshape(1, 1)), -448, 448).to(FP8_DTYPE).float()
        assert not torch.equal(f32, theirs.float())
