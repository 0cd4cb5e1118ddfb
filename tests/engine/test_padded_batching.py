"""Calibration samples of different lengths run through each layer as right-padded batches.

On an accelerator that is the default; on a CPU (these tests) ``max_padding`` asks for it.

Reference: the same job with ``batch_calibration=False`` (every sample alone through every layer).
The statistics must be the same up to float summation order (pad positions never count), and so
the compressed weights: equal to float rounding, except that GPTQ's rounding may flip the odd
integer code where a value sits on a rounding boundary (reordering the very same samples in the
one-sample path flips as many), so codes are compared by the fraction that differ.
"""
import pytest
import torch

from compression.model_io.moe import CheckpointNames
from compression.model_io.walk import (PaddingMismatch, capture_layer_inputs, decoder_layers, masking,
                                       padded_groups, valid_rows)
from compression.recipe import Recipe
from compression.sequential import _collect_statistics, _KVRecorder, _plan_layer, compress_model
from tests.tiny import tiny_family_model, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTHS = [24, 22, 19, 30, 17, 24, 28, 9, 12, 26, 21, 16]  # as chat records come: all different lengths

SPARSE_24 = """
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier: {sparsity: 0.5, mask_structure: "2:4", targets: [Linear], ignore: [lm_head]}
"""


def variable_calibration(lengths=LENGTHS, vocab: int = 49152, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (1, n), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def test_groups_are_longest_first_within_the_token_budget_and_the_padding_bound():
    lengths = [100, 30, 95, 60, 28, 90, 200, 29, 5000]
    groups = padded_groups(lengths, batch_tokens=300, max_padding=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert lengths[group[0]] == longest
        if len(group) > 1:
            size = len(group) * longest
            assert size <= 300 and sum(longest - lengths[i] for i in group) <= 0.25 * size
    assert [sorted(lengths[i] for i in g) for g in groups] == [[5000], [200], [90, 95, 100], [30, 60], [28, 29]]
    assert all(len(g) == 1 for g in padded_groups(lengths, batch_tokens=0))


def test_valid_rows_leave_the_pad_positions_out_and_count_the_samples():
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    with masking(mask):
        rows, sequences = valid_rows(x)
        assert torch.equal(rows, x.reshape(-1, 2)[[0, 1, 2, 3]]) and sequences == 2
        flat, sequences = valid_rows(x.reshape(6, 2))  # an MoE block's flattened tokens
        assert torch.equal(flat, rows) and sequences == 2
        with pytest.raises(PaddingMismatch):
            valid_rows(x.transpose(0, 1))  # [T, B, C]: not token by token like the mask
    assert valid_rows(x)[1] == 2 and valid_rows(x[0])[1] == 1  # no padded batch: as before


def _capture(model, calibration, padded: bool):
    _, layers = decoder_layers(model)
    return capture_layer_inputs(model, layers, calibration, "cpu", padding=padded,
                                batch_tokens=4096 if padded else 0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"])
def test_padded_batches_give_every_sample_the_outputs_it_gets_alone(family):
    # Gemma 3: sliding window 4 and local/global RoPE per layer type, built by the model for the padded batch
    model = tiny_family_model(family)
    calibration = variable_calibration(vocab=256)
    padded, single = _capture(model, calibration, True), _capture(model, calibration, False)
    assert padded.padded and len(padded) < len(single) == len(calibration)
    assert sorted(s for m in padded.members for s in m) == list(range(len(calibration)))
    _, layers = decoder_layers(model)
    with torch.no_grad():
        for index, layer in enumerate(layers):
            padded = padded.advanced(padded.forward(layer, index))
            single = single.advanced(single.forward(layer, index))
            for mask, hidden in zip(padded.masks, padded.hidden):
                if mask is not None:
                    assert not hidden[~mask].any()  # pad positions are zeroed between layers
    for a, b in zip(padded.per_sample(padded.hidden), single.per_sample(single.hidden)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _layer0(model, recipe, calibration, padded: bool, kv: bool = False):
    prefix, layers = decoder_layers(model)
    inputs = _capture(model, calibration, padded)
    plans = _plan_layer(recipe, f"{prefix}.0", layers[0], CheckpointNames.for_model(model))
    recorder = _KVRecorder(recipe.kv_cache, f"{prefix}.0", layers[0]) if kv else None
    return _collect_statistics(layers[0], 0, plans, inputs, kv=recorder), recorder


def test_hessians_input_ranges_and_kv_scales_ignore_the_padding():
    model = tiny_llama()
    calibration = variable_calibration()
    assert not any(bool((s["input_ids"] == model.config.pad_token_id).any()) for s in calibration)
    _spiked_pad(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[:, 5] *= 20  # ... and in the keys
    for recipe in (Recipe.from_preset("W4A16", group_size=32), Recipe.from_preset("FP8+KV_FP8")):
        kv = recipe.kv_cache is not None
        (batched, kv_b), (single, kv_s) = (_layer0(model, recipe, calibration, p, kv=kv) for p in (True, False))
        assert batched.keys() == single.keys() and batched
        for name, entry in batched.items():
            if "hessian" in entry:
                assert entry["hessian"].samples == single[name]["hessian"].samples == len(calibration)
                h, ref = entry["hessian"].hessian, single[name]["hessian"].hessian
                # fp32 sums of the same products in another order: within 1e-6 of the largest entry
                torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
            for key in ("absmax", "lo", "hi"):
                if key in entry:  # a max over the same tokens: exact
                    assert torch.equal(entry[key], single[name][key]), (name, key)
        if kv:
            assert torch.equal(kv_b.key_absmax, kv_s.key_absmax) and torch.equal(kv_b.value_absmax, kv_s.value_absmax)


def _spiked_pad(model):
    """The pad token's embedding a spike: pad positions would stand out in any statistic that counted them."""
    pad = model.config.pad_token_id
    with torch.no_grad():
        model.model.embed_tokens.weight[pad] = 0.0
        model.model.embed_tokens.weight[pad, 5] = 1.0
    return model


def _compress(recipe, calibration, batched: bool, model=None, calls: list | None = None):
    model = model if model is not None else _spiked_pad(tiny_llama())
    _, layers = decoder_layers(model)
    handle = layers[0].register_forward_pre_hook(lambda *_: calls.append(1)) if calls is not None else None
    report = compress_model(model, recipe, calibration, batch_calibration=batched, max_padding=0.25)
    if handle is not None:
        handle.remove()
    return model, report


def _assert_same_compression(a, b, *, max_flipped: float):
    (model_a, report_a), (model_b, report_b) = a, b
    assert report_a.modules.keys() == report_b.modules.keys()
    flipped = total = 0
    for name, rec in report_a.modules.items():
        other = report_b.modules[name]
        if rec.codes is not None:
            flipped += int((rec.codes != other.codes).sum())
            total += rec.codes.numel()
        for key in ("input_scale", "input_zero_point"):
            if getattr(rec, key) is not None:
                torch.testing.assert_close(getattr(rec, key), getattr(other, key), rtol=1e-6, atol=0)
        assert rec.sparsity == other.sparsity and rec.mask_structure == other.mask_structure
    assert flipped <= max_flipped * total, f"{flipped} of {total} codes differ"
    for (name, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        # relative Frobenius difference of every weight: rounding, plus the odd flipped code
        assert float((p - q).detach().norm()) <= 2e-2 * float(q.detach().norm()) + 1e-6, name
    for k, v in report_a.kv_scales.items():
        assert torch.equal(v, report_b.kv_scales[k]), k


@pytest.mark.parametrize("preset,options,max_flipped", [
    ("W4A16", {"group_size": 32}, 1e-3),
    # lm_head too, on the last layer's padded outputs: its 49152 rows sit on many rounding boundaries; on an
    # AVX512 CPU (no AMX) reversing the samples in the one-sample path alone flips 0.19% of the codes
    ("W4A16", {"group_size": 32, "ignore": []}, 3e-3),
    ("FP8", {}, 0.0),  # static per-tensor input scales from the same maxima: identical
    ("SQ+W8A8", {}, 2e-2),  # 256 levels: more boundaries; reordering the samples alone flips 1.2%
    ("AWQ+W4A16_ASYM", {"group_size": 32}, 1e-3),
    ("FP8+KV_FP8", {}, 0.0),
])
def test_batched_compression_equals_one_sample_at_a_time(preset, options, max_flipped):
    calibration = variable_calibration()
    recipe = Recipe.from_preset(preset, **options)
    batched_calls, single_calls = [], []
    batched = _compress(recipe, calibration, True, calls=batched_calls)
    single = _compress(recipe, calibration, False, calls=single_calls)
    assert batched[1].batching == "padded batches"
    # layer 0: one statistics pass (AWQ/SmoothQuant add one per mapping) and one output pass, per batch;
    # AWQ/SmoothQuant also check each mapping's fold on the first call, before and after (two calls)
    probes = 2 * sum(1 for e in batched[1].smoothing if e["layer"] == 0 and "fold_drift" in e)
    batched_n, single_n = len(batched_calls) - probes, len(single_calls) - probes
    assert batched_n < single_n and single_n % len(calibration) == 0
    assert batched_n * len(calibration) == single_n * batched[1].layer_batches
    assert batched[1].layer_batches <= len(calibration) // 2
    if preset == "AWQ+W4A16_ASYM":
        for x, y in zip(batched[1].smoothing, single[1].smoothing):
            assert x["ratio"] == y["ratio"] and x["best_error"] == pytest.approx(y["best_error"], rel=1e-4)
    if options.get("ignore") == []:
        assert batched[1].modules["lm_head"].codes is not None
    _assert_same_compression(batched, single, max_flipped=max_flipped)


def test_sparsegpt_24_batched_equals_one_sample_at_a_time():
    calibration = variable_calibration()
    recipe = Recipe.from_yaml(SPARSE_24)
    batched, single = _compress(recipe, calibration, True), _compress(recipe, calibration, False)
    assert batched[1].batching == "padded batches"
    _assert_same_compression(batched, single, max_flipped=0.0)
    masks = [(m.weight == 0) for m in batched[0].modules() if isinstance(m, torch.nn.Linear)][:-1]
    others = [(m.weight == 0) for m in single[0].modules() if isinstance(m, torch.nn.Linear)][:-1]
    differing = sum(int((a != b).sum()) for a, b in zip(masks, others))
    assert differing <= 1e-3 * sum(m.numel() for m in masks)  # the same 2:4 masks but for near-ties


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_batched_gptq_equals_one_sample_at_a_time_on_other_families(family):
    calibration = variable_calibration(vocab=256)
    recipe = Recipe.from_preset("W4A16", group_size=32)
    batched = _compress(recipe, calibration, True, model=tiny_family_model(family))
    single = _compress(recipe, calibration, False, model=tiny_family_model(family))
    assert batched[1].batching == "padded batches" and batched[1].layer_batches < len(calibration)
    _assert_same_compression(batched, single, max_flipped=1e-3)


def test_what_cannot_honour_padding_runs_without_it():
    calibration = variable_calibration(vocab=256)
    moe = compress_model(tiny_family_model("qwen3_moe"), Recipe.from_preset("W4A16", group_size=32), calibration)
    assert "MoE" in moe.batching and moe.layer_batches == len(set(LENGTHS))  # equal lengths still share a call
    recon = compress_model(tiny_llama(), Recipe.from_preset("2:4"), variable_calibration())
    assert "reconstruction" in recon.batching and recon.layer_batches == len(set(LENGTHS))
    per_tensor = Recipe.from_yaml("""
quant_stage:
  quant_modifiers:
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
          input_activations: {num_bits: 8, type: int, symmetric: true, strategy: tensor, dynamic: true}
""")
    equal = variable_calibration([16] * 4)  # equal lengths would batch, but one scale per call depends on the batch
    report = compress_model(tiny_llama(), per_tensor, equal)
    assert "per-tensor" in report.batching and report.layer_batches == 4


def test_equal_length_samples_still_share_a_call_without_padding():
    calibration = variable_calibration([16] * 6)
    inputs = _capture(tiny_llama(), calibration, True)
    assert len(inputs) == 1 and inputs.masks == [None] and inputs.hidden[0].shape[:2] == (6, 16)
    # where padding is not allowed (reconstruction replays samples), equal lengths still batch
    calls = []
    _, report = _compress(Recipe.from_preset("2:4"), calibration, True, calls=calls)
    assert "equal-length" in report.batching and report.layer_batches == 1


def test_on_a_cpu_only_equal_lengths_share_a_call_unless_padding_is_asked_for():
    report = compress_model(tiny_llama(), Recipe.from_preset("W4A16", group_size=32), variable_calibration())
    assert "CPU" in report.batching and report.layer_batches == len(set(LENGTHS))


def test_an_accelerator_pads_by_default():
    from compression.model_io.walk import BATCH_TOKENS, MAX_PADDING
    from compression.sequential import batching_plan

    recipe = Recipe.from_preset("W4A16", group_size=32)
    assert batching_plan(tiny_llama(), recipe, "cuda:0") == (None, BATCH_TOKENS, MAX_PADDING)
    assert batching_plan(tiny_llama(), recipe, "cpu")[0].startswith("a CPU")
    assert batching_plan(tiny_llama(), recipe, "cpu", max_padding=0.1) == (None, BATCH_TOKENS, 0.1)
    assert batching_plan(tiny_llama(), recipe, "cuda", batch_calibration=False)[1] == 0
    assert "MoE" in batching_plan(tiny_family_model("qwen3_moe"), recipe, "cuda")[0]


def test_offloaded_activations_carry_their_token_masks_to_the_device():
    recipe = Recipe.from_preset("W4A16", group_size=32)
    runs = [compress_model(tiny_llama(), recipe, variable_calibration(), max_padding=0.25, offload_activations=offload)
            for offload in (False, True)]
    assert runs[1].batching == "padded batches" and runs[1].layer_batches == runs[0].layer_batches < len(LENGTHS)
    for name, rec in runs[0].modules.items():
        assert torch.equal(rec.codes, runs[1].modules[name].codes), name


def _stage(body: str, stage: str = "quant_stage", group: str = "quant_modifiers") -> str:
    return f"{stage}:\n  {group}:\n" + "".join(f"    {line}\n" for line in body.strip("\n").split("\n"))


@pytest.mark.parametrize("body,stage,max_flipped", [
    ("QuantizationModifier: {targets: Linear, scheme: FP8, ignore: [lm_head], "
     "kv_cache_scheme: {num_bits: 8, type: float, strategy: attn_head}}", "quant", 0.0),  # per-KV-head K/V scales
    ("LogarithmicEqualizationModifier: {}\nQuantizationModifier: {scheme: W8A8, ignore: [lm_head]}", "quant", 2e-2),
    ("WandaPruningModifier: {sparsity: 0.5, mask_structure: '2:4', targets: [Linear], ignore: [lm_head]}",
     "sparsity", 0.0),
    ("SparseGPTModifier: {sparsity: 0.5, sparsity_profile: owl, owl_m: 2, owl_lmbda: 0.1, ignore: [lm_head]}",
     "sparsity", 0.0),  # OWL's activation norms
])
def test_other_recipe_paths_batched_equal_one_sample_at_a_time(body, stage, max_flipped):
    text = _stage(body) if stage == "quant" else _stage(body, "sparsity_stage", "sparsity_modifiers")
    recipe = Recipe.from_yaml(text)
    calibration = variable_calibration()
    batched, single = _compress(recipe, calibration, True), _compress(recipe, calibration, False)
    assert batched[1].batching == "padded batches"
    _assert_same_compression(batched, single, max_flipped=max_flipped)
