"""AWQ / SmoothQuant smoothing: one layer forward per layer, the fast fake quantization and the
Gram-matrix error for a Linear parent give the results of the straightforward algorithm.

The reference below is that algorithm written out plainly: per mapping, run the layer to record the
parent's calls and the balance inputs, then for every grid point quantize with the generic
``fake_quantize``, replay the parent on every call and take the mean squared output error (float64).
"""
import copy

import pytest
import torch

from compression.algorithms import awq as awq_lib
from compression.algorithms import smoothquant as sq_lib
from compression.algorithms.quant import QuantArgs, compute_qparams, fake_quantize, fp4_global_scale
from compression.algorithms.smoothing import _resolve, _scheme_for, smooth_layer
from compression.model_io.walk import capture_layer_inputs, masking, token_mask, valid_rows
from compression.recipe import Recipe
from compression.sequential import CompressionReport
from tests.engine.test_padded_batching import variable_calibration
from tests.tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMES = [dict(num_bits=4, symmetric=False, strategy="group", group_size=32),
           dict(num_bits=4, symmetric=True, strategy="group", group_size=64),
           dict(num_bits=8, symmetric=True, strategy="channel"),
           dict(num_bits=8, symmetric=False, strategy="channel"),
           dict(num_bits=8, symmetric=True, strategy="tensor"),
           dict(num_bits=4, symmetric=False, strategy="group", group_size=32, scale_dtype="bfloat16"),
           dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
           dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16)]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_search_fake_quant_equals_the_generic_one_bit_for_bit(scheme):
    args = QuantArgs(**scheme)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 4, 256)
    g = fp4_global_scale(w) if args.has_global_scale else None
    scale, zp = compute_qparams(w, args, torch.float32, global_scale=g)
    expected = fake_quantize(w.float(), scale, args, zero_point=zp, global_scale=g)
    assert torch.equal(awq_lib._fake_quant(w, args), expected)


@torch.no_grad()
def _reference(recipe: Recipe, layer, inputs, prefix="model.layers.0"):
    """[(ratio or None, scales)] per mapping, smoothing ``layer`` in place the straightforward way."""
    modifier = next(m for m in recipe.modifiers if m.transforms)
    out = []
    for mapping in _resolve(modifier, prefix, layer, "stages[0].modifiers[0]"):
        balance = [m for _, m in mapping["balance"]]
        parent = mapping["parent"][1]
        calls, xs = [], []
        h1 = parent.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k), token_mask())),
                                              with_kwargs=True)
        h2 = balance[0].register_forward_hook(lambda m, a, o: xs.append(valid_rows(a[0])[0].double()))
        inputs.forward(layer, 0, keep=False)
        h1.remove(), h2.remove()
        x = torch.cat(xs)

        def replay():
            outs = []
            for a, k, mask in calls:
                with masking(mask):
                    o = parent(*a, **k)
                    o = o[0] if isinstance(o, tuple) else o
                    outs.append((o if mask is None else valid_rows(o)[0]).double())
            return outs

        ratio = None
        if modifier.kind == "AWQModifier":
            schemes = [_scheme_for(recipe, n, m) for n, m in mapping["balance"]]
            originals = [m.weight.data.clone() for m in balance]
            reference = replay()
            w_mean = awq_lib.weight_means(originals, schemes)
            x_mean = x.abs().mean(0).float()
            best = None
            for r, duo in awq_lib.grid_points(modifier.n_grid, modifier.duo_scaling):
                s = (x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4) if duo else x_mean.pow(r).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                for m, w, a in zip(balance, originals, schemes):
                    scaled = w.float() * s
                    mm = QuantArgs(**{**a.to_dict(), "observer": "minmax", "actorder": None})
                    sc, zp = compute_qparams(scaled, mm, torch.float32)
                    m.weight.data = (fake_quantize(scaled, sc, mm, zero_point=zp) / s).to(w.dtype)
                err = sum(float((o - f).pow(2).sum()) for o, f in zip(replay(), reference))
                err /= sum(f.numel() for f in reference)
                if best is None or err < best[0]:
                    best = (err, r, s)
            for m, w in zip(balance, originals):
                m.weight.data = w
            _, ratio, scales = best
        elif modifier.algorithm == "log_equalization":
            scales = sq_lib.log_equalization_scales((x.amax(0) - x.amin(0)).float())
        else:
            scales = sq_lib.smoothquant_scales(x.abs().amax(0).float(), [m.weight for m in balance],
                                               modifier.smoothing_strength)
        sq_lib.fold_scales(mapping["smooth"][1], balance, scales)
        out.append((ratio, scales))
    return out


W4 = ("    QuantizationModifier:\n      config_groups:\n        g:\n          targets: [Linear]\n"
      "          weights: {num_bits: 4, symmetric: false, strategy: group, group_size: 32}\n")
RECIPES = {
    "awq duo": "q:\n  q_modifiers:\n    AWQModifier: {duo_scaling: true}\n" + W4,
    "awq both": "q:\n  q_modifiers:\n    AWQModifier: {duo_scaling: both, n_grid: 10}\n" + W4,
    "awq plain": "q:\n  q_modifiers:\n    AWQModifier: {duo_scaling: false, n_grid: 8}\n" + W4,
    "smoothquant": "q:\n  q_modifiers:\n    SmoothQuantModifier: {smoothing_strength: 0.8}\n"
                   "    GPTQModifier: {scheme: W8A8, targets: [Linear]}\n",
    "log equalization": "q:\n  q_modifiers:\n    SmoothQuantModifier: {algorithm: log_equalization}\n"
                        "    GPTQModifier: {scheme: W8A8, targets: [Linear]}\n",
    # the second mapping's balance input is the first one's smooth output: it must be recorded again
    "stale mapping": "q:\n  q_modifiers:\n    SmoothQuantModifier:\n      smoothing_strength: 0.5\n"
                     "      mappings: [[['re:.*q_proj$', 're:.*k_proj$'], 're:.*input_layernorm$'],"
                     " [['re:.*v_proj$'], 're:.*input_layernorm$']]\n"
                     "    GPTQModifier: {scheme: W8A8, targets: [Linear]}\n",
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(RECIPES))
def test_one_forward_smoothing_equals_the_straightforward_algorithm(name, padded):
    recipe = Recipe.from_yaml(RECIPES[name])
    model = tiny_llama(kv_heads=4, vocab=2048)  # no grouped-query attention: v_proj → o_proj (a Linear parent)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = 12.0  # an outlier channel
    layers = list(model.model.layers)
    calibration = variable_calibration(vocab=2048)
    inputs = capture_layer_inputs(model, layers, calibration, "cpu", padding=padded,
                                  batch_tokens=4096 if padded else 0)
    layer, ref_layer = layers[0], copy.deepcopy(layers[0])
    expected = _reference(recipe, ref_layer, inputs)

    calls = []
    handle = layer.register_forward_pre_hook(lambda *a: calls.append(1))
    report = CompressionReport()
    smooth_layer(recipe, "model.layers.0", layer, inputs, report, lambda e: None, 0, 2)
    handle.remove()
    rounds = 2 if name == "stale mapping" else 1
    assert len(calls) == rounds * len(inputs.batches())  # one layer forward for all the mappings
    assert len(report.smoothing) == len(expected) == (4 if name.startswith("awq") else 2)
    for entry, (ratio, _) in zip(report.smoothing, expected):
        if ratio is not None:
            assert entry["ratio"] == round(ratio, 4), (entry, ratio)
    for (n, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_gram_error_equals_the_replayed_error():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=True)
    x = torch.randn(300, 128) * torch.linspace(0.1, 6.0, 128)
    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    replayed = awq_lib.awq_search(x.abs().mean(0), [lin], [args], lambda: [lin(x)], n_grid=20)
    gram = awq_lib.awq_search(x.abs().mean(0), [lin], [args], None, n_grid=20, gram=(x.t() @ x, x.shape[0]))
    assert gram.ratio == replayed.ratio and torch.equal(gram.scales, replayed.scales)
    assert gram.best_error == pytest.approx(replayed.best_error, rel=1e-4)
    assert gram.initial_error == pytest.approx(replayed.initial_error, rel=1e-4)
