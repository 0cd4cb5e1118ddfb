"""Preflight shape checks/estimates and calibration loading."""
import json

import pytest
import torch
from transformers import LlamaConfig

from compression import calibration as calib_mod
from compression.calibration import load_calibration
from compression.errors import CalibrationError, RecipeError
from compression.preflight import preflight
from compression.recipe import Recipe
from tests.tiny import demo_tokenizer, tiny_llama_config

SHARED_DATA = "/work/shared/data"


def smollm2_config():
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def test_it_rejects_group_size_128_for_smollm2_and_lists_sizes_that_work():
    with pytest.raises(RecipeError) as exc:
        preflight(smollm2_config(), Recipe.from_preset("W4A16"))
    assert exc.value.field == "recipe.group_size"
    assert "576" in exc.value.message and "32, 64 or per-channel" in exc.value.message


def test_group_size_64_passes_preflight_with_estimates():
    report = preflight(smollm2_config(), Recipe.from_preset("W4A16", group_size=64), samples=16, seqlen=128)
    assert report.layers == 30 and report.targeted_modules == 30 * 7
    assert 100e6 < report.params < 200e6
    assert report.peak_host_mb > 0 and report.peak_device_mb > 0 and report.estimated_seconds > 0
    assert report.warnings  # 16 samples is few


def test_the_host_estimate_charges_what_one_layer_step_allocates():
    """The CPU workspace is one Linear's fp32 copies (3 round-to-nearest, 5 GPTQ + the layer's Hessians
    and an inverse, and GPTQ's float64 scale refit) and one calibration batch (at most 4096 tokens) through the MLP; a data-free recipe
    runs no calibration pass. Differences between recipes isolate each term."""
    hidden, inter = 256, 1024
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1000)
    mb = 2 ** 20

    def host(preset, samples=16, seqlen=256):
        return preflight(cfg, Recipe.from_preset(preset), samples=samples, seqlen=seqlen).peak_host_mb * mb

    free = host("FP8_DYNAMIC")
    for samples, seqlen in ((16, 256), (1, 16), (64, 512)):  # 4096, 16 and (capped) 4096 tokens per batch
        tokens = min(4096, samples * seqlen)
        # one set of activations (each layer's outputs overwrite its inputs) + one batch's MLP
        charged = samples * seqlen * hidden * 4 + 3 * tokens * inter * 4
        assert host("FP8", samples, seqlen) - free == pytest.approx(charged, abs=0.2 * mb)
    largest = inter * hidden  # gate/up/down
    hessians = (4 * hidden ** 2 + 2 * hidden ** 2 + inter ** 2) * 4  # q, k, v, o, gate, up: hidden; down: inter
    refit = 8 * (inter ** 2 + 3 * hidden * inter)  # GPTQ's float64 refit of down_proj (the largest in²)
    assert host("W8A8") - host("FP8") == pytest.approx(2 * hessians + 2 * largest * 4 + refit, abs=0.2 * mb)
    # a second stream: SmoothQuant replays the activations, so both sets are charged
    acts = 16 * 256 * hidden * 4
    assert host("SQ+W8A8") - host("W8A8") == pytest.approx(acts, abs=0.2 * mb)


def test_the_host_estimate_charges_awqs_clipping_hessians_and_refit():
    """AWQ's clipping needs the Hessians of the projections it clips (all but q/k) and refits in float64."""
    hidden, inter = 256, 1024
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1000)
    mb = 2 ** 20

    def host(clip: bool):
        recipe = Recipe.from_preset("AWQ+W4A16_ASYM", group_size=64)
        recipe.modifiers[0].apply_clip = clip
        return preflight(cfg, recipe, samples=16, seqlen=256).peak_host_mb * mb

    largest = inter * hidden
    hessians = (4 * hidden ** 2 + inter ** 2) * 4  # v, o, gate, up: hidden; down: inter (q and k stay unclipped)
    refit = 8 * (inter ** 2 + 3 * hidden * inter)
    assert host(True) - host(False) == pytest.approx(2 * hessians + 2 * largest * 4 + refit, abs=0.2 * mb)


def test_it_rejects_24_sparsity_when_widths_are_not_divisible_by_four():
    cfg = {"hidden_size": 130, "intermediate_size": 256, "num_attention_heads": 1, "num_hidden_layers": 2,
           "vocab_size": 100}  # a plain dict works too
    with pytest.raises(RecipeError) as exc:
        preflight(cfg, Recipe.from_preset("2:4"))
    assert exc.value.field == "recipe.mask_structure" and "130" in exc.value.message


def test_ignored_modules_are_not_checked():
    cfg = tiny_llama_config(hidden=128, intermediate=200)  # down_proj input 200 % 128 != 0
    with pytest.raises(RecipeError):
        preflight(cfg, Recipe.from_preset("W4A16"))
    preflight(cfg, Recipe.from_preset("W4A16", ignore=["lm_head", "re:.*down_proj"]))


def test_calibration_uses_the_chat_template_for_messages():
    tok = demo_tokenizer()
    samples = load_calibration("calibration/self_instruct_seed_tasks.jsonl", tok, samples=3, seqlen=64,
                               data_dir=SHARED_DATA)
    assert len(samples) == 3
    for s in samples:
        assert s["input_ids"].shape == s["attention_mask"].shape and s["input_ids"].shape[0] == 1
        assert 2 <= s["input_ids"].shape[1] <= 64 and s["input_ids"].dtype == torch.long
    text = tok.decode(samples[0]["input_ids"][0])
    assert "<|im_start|>" in text


def test_calibration_is_reproducible_for_a_seed():
    tok = demo_tokenizer()
    a = load_calibration("calibration/self_instruct_seed_tasks.jsonl", tok, samples=2, seqlen=32, data_dir=SHARED_DATA)
    b = load_calibration("calibration/self_instruct_seed_tasks.jsonl", tok, samples=2, seqlen=32, data_dir=SHARED_DATA)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_calibration_reads_text_fields_of_other_jsonl_files(tmp_path):
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps({"question": f"Why is the sky blue? {i}"})
                                                 for i in range(3)))
    samples = load_calibration("qa.jsonl", demo_tokenizer(), samples=5, seqlen=32, data_dir=tmp_path)
    assert len(samples) == 3 and "sky" in demo_tokenizer().decode(samples[0]["input_ids"][0])


@pytest.mark.parametrize("source", ["../etc/passwd.jsonl", "/etc/passwd.jsonl", "calibration/../../x.jsonl"])
def test_it_rejects_calibration_paths_outside_the_data_directory(source, tmp_path):
    with pytest.raises(CalibrationError) as exc:
        load_calibration(source, demo_tokenizer(), samples=1, seqlen=8, data_dir=tmp_path)
    assert exc.value.field == "calibration.source" and "outside the data directory" in exc.value.message


def test_hub_datasets_are_loaded_through_datasets(monkeypatch):
    calls = []

    def fake_hub(name, split, seed, limit):
        calls.append((name, split, seed, limit))
        return [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4

    monkeypatch.setattr(calib_mod, "_load_hub_dataset", fake_hub)
    samples = load_calibration("HuggingFaceH4/ultrachat_200k:train_sft", demo_tokenizer(), samples=2, seqlen=16,
                               data_dir="/nonexistent")
    assert len(samples) == 2 and calls == [("HuggingFaceH4/ultrachat_200k", "train_sft", 0, 4)]


def test_it_rejects_sources_that_are_neither_files_nor_hub_ids(tmp_path):
    with pytest.raises(CalibrationError):
        load_calibration("not-a-dataset", demo_tokenizer(), samples=1, seqlen=8, data_dir=tmp_path)


def test_the_time_estimate_charges_awqs_grid_smoothquant_and_gptq_resweeps():
    """AWQ's grid search (its parents run once per grid point) dominates an AWQ job; SmoothQuant adds one
    statistics forward per mapping; a refitted <= 4-bit GPTQ runs up to three sweeps, an 8-bit one a
    single sweep. Each term shows as a difference between recipes."""
    from compression.preflight import THROUGHPUT

    hidden, inter, layers, samples, seqlen = 256, 1024, 4, 16, 256
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1000)

    def seconds(recipe):
        return preflight(cfg, recipe, samples=samples, seqlen=seqlen).estimated_seconds

    layer_params = 4 * hidden ** 2 + 3 * hidden * inter
    layer_forward = 2 * layers * layer_params * samples * seqlen / THROUGHPUT["cpu"]
    awq = Recipe.from_preset("AWQ+W4A16_ASYM", group_size=64)
    rtn = Recipe.from_yaml("q:\n  q_modifiers:\n    QuantizationModifier:\n      ignore: [lm_head]\n      config_groups:\n"
                           "        g:\n          targets: [Linear]\n          weights: {num_bits: 4, symmetric: false,"
                           " strategy: group, group_size: 64}\n")
    # data-free RTN runs no calibration; AWQ: the calibration pass (2 layer forwards), 4 default mappings' statistics
    # forwards and 20 grid points x 1.35 layer forwards
    assert seconds(rtn) == 0
    assert seconds(awq) == pytest.approx((2 + 4 + 20 * 1.35) * layer_forward, rel=0.01, abs=0.2)
    awq.modifiers[0].n_grid = 10
    assert seconds(awq) == pytest.approx((2 + 4 + 10 * 1.35) * layer_forward, rel=0.01, abs=0.2)
    assert seconds(Recipe.from_preset("SQ+W8A8")) - seconds(Recipe.from_preset("W8A8")) == pytest.approx(
        2 * layer_forward, rel=0.01, abs=0.2)
    # sweeps: W4A16 group 64 (refitted, 4 bits) pays two more 2·out·in² terms than an 8-bit GPTQ would
    w4 = seconds(Recipe.from_preset("W4A16", group_size=64))
    w8 = seconds(Recipe.from_yaml("q:\n  q_modifiers:\n    GPTQModifier:\n      ignore: [lm_head]\n      config_groups:\n"
                                  "        g:\n          targets: [Linear]\n          weights: {num_bits: 8, "
                                  "symmetric: true, strategy: group, group_size: 64}\n"))
    sweep = layers * 2 * (4 * hidden * hidden ** 2 + 2 * inter * hidden ** 2 + hidden * inter ** 2) / THROUGHPUT["cpu"]
    assert w4 - w8 == pytest.approx(2 * sweep, rel=0.01, abs=0.2)
