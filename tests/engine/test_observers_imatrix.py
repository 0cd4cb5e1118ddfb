"""llm-compressor 0.14's newer weight observers: ``imatrix_mse`` (each weight's error weighted by E[x²] of
its input channel), the NVFP4 range-expansion variants (``nvfp4_expanded_mse``, its alias ``fouroversix``,
``nvfp4_expanded_imatrix``) and the MSE observers' ``expand`` option -- parsed with their presets, searched
as llm-compressor searches, and fed the calibration statistics by the pipeline."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from compression.algorithms.gptq import gptq_quantize
from compression.algorithms.quant import (IMATRIX_DEFAULTS, QuantArgs, compute_qparams, fake_quantize,
                                          qparams_from_range, observe)
from compression.errors import RecipeError
from compression.recipe import INPUT_OBSERVER_NOTE, Recipe
from compression.sequential import compress_model
from tests.engine.conftest import correlated_inputs, random_calibration
from tests.tiny import tiny_llama

ASYM4 = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=16, observer="imatrix_mse")


def _reference(w, args, importance, *, maxshrink, grid, norm, expand=1.0):
    """llm-compressor's imatrix grid search written out plainly: candidates p = 1 - i/grid for
    i = 0 ... int(maxshrink·grid), each group keeping the first candidate with the least weighted error."""
    imp = importance / importance.mean()
    lo, hi = observe(w, args)
    lo, hi = lo * expand, hi * expand
    best_err, best = None, None
    for i in range(int(maxshrink * grid) + 1):
        p = 1 - i / grid
        scale, zp = qparams_from_range(lo * p, hi * p, args, torch.float32)
        err = ((fake_quantize(w, scale, args, zero_point=zp) - w).abs().pow(norm) * imp).reshape(
            w.shape[0], -1, args.group_size).sum(-1)
        if best is None:
            best_err, best = err, scale
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best


def _weight_and_importance(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 64, generator=gen)
    w[:, ::7] *= 4  # outlier columns, so clipping them or not is a real choice
    importance = torch.rand(64, generator=gen) ** 4 * 50 + 0.01  # a few channels carry most of E[x²]
    return w, importance


def test_imatrix_search_matches_llm_compressors_grid():
    w, importance = _weight_and_importance()
    args = dataclasses.replace(ASYM4, observer_kwargs={"patience": 1000})
    scale, _ = compute_qparams(w, args, torch.float32, importance=importance)
    want = _reference(w, args, importance, maxshrink=IMATRIX_DEFAULTS["maxshrink"], grid=IMATRIX_DEFAULTS["grid"],
                      norm=IMATRIX_DEFAULTS["norm"])
    assert torch.equal(scale, want)
    # the importance changes the choice: uniform weights pick other ranges for some groups
    uniform, _ = compute_qparams(w, args, torch.float32, importance=torch.ones(64))
    assert not torch.equal(uniform, scale)
    assert torch.equal(uniform, _reference(w, args, torch.ones(64), maxshrink=0.95, grid=20, norm=3.0))


@pytest.mark.parametrize("bad", [None, torch.zeros(64), torch.full((64,), float("nan")), -torch.ones(64),
                                 torch.ones(63)])
def test_unusable_importance_falls_back_to_the_plain_search(bad):
    """llm-compressor's rule: no data, non-finite, negative, all-zero or mis-sized importance -> uniform MSE."""
    w, _ = _weight_and_importance()
    plain, _ = compute_qparams(w, ASYM4, torch.float32, importance=torch.ones(64))
    assert torch.equal(compute_qparams(w, ASYM4, torch.float32, importance=bad)[0], plain)


def test_expand_starts_the_search_above_the_observed_range():
    """maxshrink·grid < 1: the MSE observer tries only expand x the min-max range; the imatrix observer
    (whose grid always has at least two points, as llm-compressor's) that and (1 - 1/grid) of it."""
    w, _ = _weight_and_importance()
    for observer in ("mse", "imatrix_mse"):
        args = dataclasses.replace(ASYM4, observer=observer, observer_kwargs={"expand": 1.8, "maxshrink": 0.05,
                                                                              "grid": 10.0})
        lo, hi = observe(w, args)
        widest, _ = qparams_from_range(lo * 1.8, hi * 1.8, args, torch.float32)
        second, _ = qparams_from_range(lo * 1.8 * 0.9, hi * 1.8 * 0.9, args, torch.float32)
        got, _ = compute_qparams(w, args, torch.float32, importance=torch.ones(64))
        if observer == "mse":
            assert torch.equal(got, widest)
        else:
            assert bool(((got == widest) | (got == second)).all()) and bool((got == second).any())
        minmax, _ = qparams_from_range(lo, hi, args, torch.float32)
        assert bool((got > minmax).all())


def _recipe(observer: str, kwargs: str = "", modifier: str = "QuantizationModifier") -> Recipe:
    return Recipe.from_yaml(
        f"q:\n  q_modifiers:\n    {modifier}:\n      ignore: [lm_head]\n      config_groups:\n        g:\n"
        f"          targets: [Linear]\n          weights: {{num_bits: 4, symmetric: false, strategy: group, "
        f"group_size: 32, observer: {observer}{kwargs}}}\n")


@pytest.mark.parametrize("name,kind,expected", [
    ("imatrix_mse", "imatrix_mse", {}),
    ("nvfp4_expanded_mse", "mse", {"expand": 1.8, "grid": 200.0, "patience": 1000}),
    ("fouroversix", "mse", {"expand": 1.8, "grid": 200.0, "patience": 1000}),
    ("nvfp4_expanded_imatrix", "imatrix_mse", {"expand": 1.8, "grid": 200.0, "norm": 2.4}),
])
def test_named_observers_parse_with_llm_compressors_presets(name, kind, expected):
    recipe = _recipe(name)
    weights = recipe.modifiers[0].config_groups["g"].weights
    assert weights.observer == kind
    assert {k: weights.observer_kwargs[k] for k in expected} == expected
    if "expand" in expected:
        assert weights.observer_kwargs["maxshrink"] == pytest.approx(1 - 0.8 / 1.8)
    # an importance-weighted observer reads the calibration data, so the recipe needs it
    assert recipe.needs_calibration == (kind == "imatrix_mse")
    # the recipe's own kwargs win over the presets, and survive the YAML round trip
    own = _recipe(name, ", observer_kwargs: {grid: 50, patience: 0, strict: true}")
    w2 = Recipe.from_yaml(own.to_yaml()).modifiers[0].config_groups["g"].weights
    assert (w2.observer, w2.observer_kwargs["grid"], w2.observer_kwargs["patience"], w2.observer_kwargs["strict"]) \
        == (kind, 50, 0, True)


@pytest.mark.parametrize("kwargs,field", [
    (", observer_kwargs: {expand: 0.5}", "expand"),
    (", observer_kwargs: {strict: 1}", "strict"),
    (", observer_kwargs: {grid: -3}", "grid"),
    (", observer_kwargs: {patience: -1}", "patience"),
    (", observer_kwargs: {maxshrink: 1.0}", "maxshrink"),
    (", observer_kwargs: {shrink: 0.5}", "shrink"),
    (", observer_kwargs: {grid: 1000000000, patience: 1000000000}", "grid"),  # a search that never ends
    (", observer_kwargs: {expand: 1e300}", "expand"),
    (", observer_kwargs: {norm: .inf}", "norm"),
])
def test_bad_observer_kwargs_are_refused_with_the_field(kwargs, field):
    with pytest.raises(RecipeError) as exc:
        _recipe("imatrix_mse", kwargs)
    assert exc.value.field.endswith(f".weights.observer_kwargs.{field}")


def test_an_input_observer_that_searches_is_noted():
    recipe = Recipe.from_yaml(
        "q:\n  q_modifiers:\n    QuantizationModifier:\n      ignore: [lm_head]\n      config_groups:\n        g:\n"
        "          targets: [Linear]\n          weights: {num_bits: 8, symmetric: true, strategy: channel}\n"
        "          input_activations: {num_bits: 8, symmetric: true, strategy: tensor, dynamic: false, "
        "observer: imatrix_mse}\n")
    assert INPUT_OBSERVER_NOTE in recipe.notes


def test_gptq_weighs_the_observer_by_the_hessian_diagonal():
    x = correlated_inputs(tokens=256, cols=64)
    x[:, 5] *= 20  # one loud channel
    hessian = 2 * x.T @ x / x.shape[0]
    w, _ = _weight_and_importance(1)
    result = gptq_quantize(w, hessian, ASYM4, refit=False, scale_dtype=torch.float32)
    want, _ = compute_qparams(w, ASYM4, torch.float32, importance=torch.diag(hessian))
    assert torch.equal(result.scale, want)


@pytest.mark.usefixtures("one_torch_thread")
def test_the_pipeline_feeds_each_module_its_inputs_squares():
    """Layer 0's q_proj sees the embeddings through input_layernorm in both the dense model and the
    pipeline, so its E[x²] can be recomputed here; the exported scales are the imatrix search's on it."""
    model, dense = tiny_llama(), tiny_llama()
    with torch.no_grad():  # loud channels, so the importance is far from uniform
        for m in (model, dense):
            m.model.layers[0].input_layernorm.weight.mul_(torch.linspace(0.1, 8.0, 128))
    calib = random_calibration(n=3, length=16, vocab=model.config.vocab_size)
    squares = torch.zeros(128)

    def hook(mod, args):
        squares.add_(args[0].reshape(-1, 128).float().pow(2).sum(0))
    handle = dense.model.layers[0].self_attn.q_proj.register_forward_pre_hook(hook)
    with torch.no_grad():
        for sample in calib:
            dense(**sample)
    handle.remove()
    recipe = _recipe("imatrix_mse")
    report = compress_model(model, recipe, calib)
    args = recipe.modifiers[0].config_groups["g"].weights
    weight = dense.model.layers[0].self_attn.q_proj.weight.detach()
    want, _ = compute_qparams(weight, args, weight.dtype, importance=squares)
    plain, _ = compute_qparams(weight, args, weight.dtype, importance=None)
    assert not torch.equal(want, plain)  # the check below can tell the two apart
    assert torch.equal(report.modules["model.layers.0.self_attn.q_proj"].scale, want)


def test_the_triton_search_buffer_is_accepted_with_a_note():
    from compression.recipe import TRITON_BUFFER_NOTE

    recipe = _recipe("nvfp4_expanded_mse", ", observer_kwargs: {triton_error_buffer: 0.3}")
    assert TRITON_BUFFER_NOTE in recipe.notes
    assert TRITON_BUFFER_NOTE not in _recipe("nvfp4_expanded_mse").notes


def test_expanded_nvfp4_ranges_fit_fp8_group_scales():
    """nvfp4_expanded_mse widens group ranges up to 1.8x: the global scale leaves room for that, so no FP8
    group scale overflows (a NaN in float8_e4m3fn) and the error is not above plain NVFP4's."""
    from compression.algorithms.gptq import quantize_weight

    recipe = Recipe.from_yaml("q:\n  q_modifiers:\n    QuantizationModifier:\n      ignore: [lm_head]\n"
                              "      targets: [Linear]\n      scheme: NVFP4A16\n      weight_observer: nvfp4_expanded_mse\n")
    args = next(iter(recipe.modifiers[0].config_groups.values())).weights
    plain = dataclasses.replace(args, observer="minmax", observer_kwargs={})
    w, _ = _weight_and_importance(3)
    expanded, minmax = quantize_weight(w, args, torch.bfloat16), quantize_weight(w, plain, torch.bfloat16)
    assert torch.isfinite(expanded.scale.float()).all() and torch.isfinite(expanded.weight).all()
    assert float(expanded.global_scale) == pytest.approx(float(minmax.global_scale) / 1.8)
    err = lambda r: float((r.weight.float() - w).abs().pow(2.4).sum())  # noqa: E731
    assert err(expanded) <= err(minmax)


def test_an_autoround_scheme_with_a_searching_observer_is_noted():
    from compression.recipe import AUTOROUND_OBSERVER_NOTE

    assert AUTOROUND_OBSERVER_NOTE in _recipe("imatrix_mse", modifier="AutoRoundModifier").notes
    assert AUTOROUND_OBSERVER_NOTE not in _recipe("minmax", modifier="AutoRoundModifier").notes


def test_strict_imatrix_fails_on_a_module_without_usable_statistics_naming_the_group_field():
    """Layer 0's attention reads an all-zero input (its norm's weight is 0): Σx² is zero, unusable."""
    from compression.errors import CalibrationError

    calib = random_calibration(n=2, length=8, vocab=1024)
    for strict in (False, True):
        model = tiny_llama(vocab=1024)
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight.zero_()
        recipe = _recipe("imatrix_mse", ", observer_kwargs: {strict: true}" if strict else "")
        if not strict:  # falls back to the plain MSE search, as llm-compressor does
            report = compress_model(model, recipe, calib)
            assert "model.layers.0.self_attn.q_proj" in report.modules
            continue
        with pytest.raises(CalibrationError) as caught:
            compress_model(model, recipe, calib)
        assert "model.layers.0.self_attn" in str(caught.value) and "strict" in str(caught.value)
        assert caught.value.field.endswith(".config_groups.g.weights.observer_kwargs.strict"), caught.value.field
