"""Families beyond the core twelve (tests/tiny.py FAMILIES), each for what makes it different:

* gpt-oss: experts stored transposed with gate/up rows interleaved, biases and a clamped SwiGLU;
* Llama 4: experts stored transposed and called with pre-routed, router-scaled rows (no top-k indices);
* HunYuan-MoE: the router's weight is a Linear inside the gate module (``mlp.gate.wg``);
* Qwen3-Next: (1 + weight) RMSNorms, linear-attention layers without a KV cache;
* MiniMax: the normed hidden states are also the residual, so smoothing its norms would change the model;
* OLMo / OLMo 2: norms without weights and post-norm blocks, where AWQ's default mappings do not fit;
* Falcon, GPT-J, MPT, BLOOM: decoder layers that return tuples; Falcon's ``FalconLinear`` (an ``nn.Linear``
  subclass) matched by the target ``Linear``; the KV cache passed as ``layer_past``; BLOOM's per-sample
  ALiBi bias (equal-length samples cannot share it in one batched call).

Built from transformers' own config classes; compressed, exported, loaded through our runtime.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compression.errors import RecipeError
from compression.model_io.export import export_checkpoint
from compression.model_io.moe import PerExpertLinears, unfuse_experts
from compression.model_io.runtime import load_compressed_model
from compression.recipe import Recipe
from compression.sequential import compress_model
from tests.engine.conftest import random_calibration, read_safetensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32, num_experts=4, num_local_experts=4)
CONFIGS = {
    "gpt_oss": {**_MOE, "head_dim": 16, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "llama4_text": {**_MOE, "head_dim": 16, "intermediate_size_mlp": 128, "interleave_moe_layer_step": 1},
    "hunyuan_v1_moe": {**_MOE, "head_dim": 16},
    "qwen3_next": {**_MOE, "head_dim": 16, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
                   "linear_key_head_dim": 16, "linear_value_head_dim": 16, "shared_expert_intermediate_size": 64,
                   "layer_types": ["linear_attention", "full_attention"]},
    "olmo": {},
    "olmo2": {},
    "falcon": {},
    "gptj": {"rotary_dim": 8},
    "mpt": {},
    "bloom": {},
    "minimax": {**_MOE, "head_dim": 16, "layer_types": ["full_attention", "full_attention"]},
    "llama": {},
}
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
KV_FP8 = """
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          weights: {num_bits: 8, type: float, strategy: channel, dynamic: false, symmetric: true}
          input_activations: {num_bits: 8, type: float, strategy: token, dynamic: true, symmetric: true}
          targets: [Linear]
      kv_cache_scheme: {num_bits: 8, type: float, strategy: tensor, dynamic: false, symmetric: true}
"""


def _model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**_COMMON, **CONFIGS[family], **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _compress_export_reload(model, recipe, tmp_path):
    report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=256))
    ours = _logits(model)
    out = tmp_path / "export"
    export_checkpoint(model, None, recipe, report, out)
    runtime = _logits(load_compressed_model(out))
    return report, ours, runtime, out


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_transposed_interleaved_and_prerouted_experts_split_into_linears_without_changing_the_model(family):
    model = _model(family)
    before = _logits(model)
    replaced = unfuse_experts(model)
    assert replaced and all(isinstance(model.get_submodule(n), PerExpertLinears) for n in replaced)
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text", "hunyuan_v1_moe"])
def test_moe_families_compress_every_expert_and_reload_through_the_runtime(family, tmp_path):
    model = _model(family)
    dense = _logits(model)
    recipe = Recipe.from_preset("W4A16", group_size=32)
    report, ours, runtime, out = _compress_export_reload(model, recipe, tmp_path)
    experts = [n for n in report.modules if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # 2 layers x 4 experts x gate/up/down
    tensors = read_safetensors(out)
    assert all(f"{n}.weight_packed" in tensors for n in experts)
    torch.testing.assert_close(runtime, ours, rtol=2e-2, atol=2e-2)
    assert torch.nn.functional.cosine_similarity(ours.flatten(), dense.flatten(), dim=0) > 0.9
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    for router in report.routers:  # 16-bit, named in ignore, as the checkpoint spells it
        assert router in ignore and f"{router}.weight" in tensors
        assert tensors[f"{router}.weight"].dtype == torch.float32


def test_a_router_weight_held_by_a_linear_inside_the_gate_stays_16_bit(tmp_path):
    model = _model("hunyuan_v1_moe")
    report = compress_model(model, Recipe.from_preset("FP8_DYNAMIC"), None)
    assert sorted(report.routers) == [f"model.layers.{i}.mlp.gate.wg" for i in range(2)]
    assert not any(".gate.wg" in n for n in report.modules)
    assert isinstance(model.model.layers[0].mlp.gate.wg, torch.nn.Linear)


def test_one_plus_weight_norms_are_recognised_by_what_they_compute():
    from compression.algorithms.smoothquant import adds_one, fold_scales

    model = _model("qwen3_next")
    norm = model.model.layers[1].post_attention_layernorm  # Qwen3NextRMSNorm: x * (1 + w)
    assert adds_one(norm)
    assert not adds_one(torch.nn.LayerNorm(8)) and not adds_one(torch.nn.RMSNorm(8))
    with torch.no_grad():
        norm.weight.normal_(0, 0.1)
        x = torch.randn(5, 64)
        linear = torch.nn.Linear(64, 16, bias=False)
        before = linear(norm(x))
        weight = norm.weight.clone()
        fold_scales(norm, [linear], torch.rand(64) + 0.5)
        torch.testing.assert_close(linear(norm(x)), before, rtol=1e-4, atol=1e-5)
        assert not torch.equal(norm.weight, weight)


def test_smoothquant_keeps_a_qwen3_next_model_close_and_kv_scales_cover_only_attention_layers(tmp_path):
    model = _model("qwen3_next")
    dense = _logits(model)
    recipe = Recipe.from_yaml("""
default_stage:
  default_modifiers:
    SmoothQuantModifier: {smoothing_strength: 0.8}
    GPTQModifier: {targets: Linear, scheme: W8A8, ignore: [lm_head]}
""")
    report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=256))
    assert report.smoothing
    cosine = torch.nn.functional.cosine_similarity(_logits(model).flatten(), dense.flatten(), dim=0)
    assert cosine > 0.99, float(cosine)  # folding into a (1 + w) norm as if it were w broke this (0.81)

    model = _model("qwen3_next")
    report, ours, runtime, out = _compress_export_reload(model, Recipe.from_yaml(KV_FP8), tmp_path)
    # layer 0 is linear attention (no KV cache), layer 1 full attention
    assert sorted(report.kv_scales) == ["model.layers.1.self_attn.k_scale", "model.layers.1.self_attn.v_scale"]
    assert "model.layers.1.self_attn.k_scale" in read_safetensors(out)
    torch.testing.assert_close(runtime, ours, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["olmo", "olmo2"])
def test_awq_default_mappings_that_do_not_fit_a_post_norm_or_weightless_norm_family_are_left_out(family, tmp_path):
    model = _model(family)
    recipe = Recipe.from_yaml("""
default_stage:
  default_modifiers:
    AWQModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 32}
""")
    report, ours, runtime, _ = _compress_export_reload(model, recipe, tmp_path)
    applied = [e for e in report.smoothing if "skipped" not in e]
    assert applied and {e["smooth_layer"].rsplit(".", 1)[-1] for e in applied} <= {"v_proj", "up_proj"}
    if family == "olmo2":  # post-norm: its norms exist but feed nothing the mappings name
        assert any("does not feed" in e["skipped"] for e in report.smoothing if "skipped" in e)
    torch.testing.assert_close(runtime, ours, rtol=2e-2, atol=2e-2)


def test_a_mapping_onto_a_norm_without_weights_is_refused_naming_the_mappings():
    model = _model("olmo")
    recipe = Recipe.from_yaml("""
default_stage:
  default_modifiers:
    SmoothQuantModifier:
      smoothing_strength: 0.5
      mappings: [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]]
    QuantizationModifier: {targets: Linear, scheme: W8A8, ignore: [lm_head]}
""")
    with pytest.raises(RecipeError) as exc:
        compress_model(model, recipe, random_calibration(n=2, length=16, vocab=256))
    assert exc.value.field.endswith(".mappings") and "no weight" in exc.value.message


@pytest.mark.parametrize("family", ["falcon", "gptj", "mpt", "bloom"])
def test_layers_that_return_tuples_calibrate_compress_and_cache_fp8_kv(family, tmp_path):
    model = _model(family)
    dense = _logits(model)
    report, ours, runtime, _ = _compress_export_reload(model, Recipe.from_preset("W4A16", group_size=32), tmp_path)
    assert len(report.modules) >= 8  # FalconLinear is a Linear to the target "Linear"
    torch.testing.assert_close(runtime, ours, rtol=2e-2, atol=2e-2)
    assert torch.nn.functional.cosine_similarity(ours.flatten(), dense.flatten(), dim=0) > 0.9

    model = _model(family)
    report, ours, runtime, _ = _compress_export_reload(model, Recipe.from_yaml(KV_FP8), tmp_path / "kv")
    assert len(report.kv_scales) == 4  # k and v for each of the two layers
    torch.testing.assert_close(runtime, ours, rtol=2e-2, atol=2e-2)


def test_a_kv_cache_scheme_on_a_hybrid_config_without_attention_layers_is_refused_before_any_work():
    from compression.preflight import preflight

    config = AutoConfig.for_model("qwen3_next", **{**_COMMON, **CONFIGS["qwen3_next"],
                                                   "layer_types": ["linear_attention", "linear_attention"]})
    with pytest.raises(RecipeError) as exc:
        preflight(config, Recipe.from_yaml(KV_FP8))
    assert exc.value.field == "recipe.kv_cache_scheme"
    preflight(AutoConfig.for_model("qwen3_next", **{**_COMMON, **CONFIGS["qwen3_next"]}), Recipe.from_yaml(KV_FP8))


SQ_W8A8 = """
default_stage:
  default_modifiers:
    SmoothQuantModifier: {smoothing_strength: 0.8%s}
    GPTQModifier: {targets: Linear, scheme: W8A8, ignore: [lm_head]}
"""


def test_a_default_smoothing_mapping_whose_fold_would_change_the_layer_is_left_out_and_said_so():
    from compression.finetune_stage import creation_steps

    model = _model("minimax")
    dense = _logits(model)
    recipe = Recipe.from_yaml(SQ_W8A8 % "")
    report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=256))
    skipped = [e for e in report.smoothing if "skipped" in e]
    assert skipped and not [e for e in report.smoothing if "skipped" not in e]
    assert all("changes MiniMaxDecoderLayer's output" in e["skipped"] for e in skipped)
    cosine = torch.nn.functional.cosine_similarity(_logits(model).flatten(), dense.flatten(), dim=0)
    assert cosine > 0.995, float(cosine)  # folding into the norm anyway gave 0.984
    steps = creation_steps(recipe, {"source": "random", "samples": 4, "seqlen": 16}, report)
    assert any(s.startswith("Smoothing: SmoothQuant") and "applied to no module" in s for s in steps)

    model = _model("llama")  # an exact family: every mapping folded, with its drift recorded
    report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=256))
    assert report.smoothing and all(e["fold_drift"] < 1e-4 for e in report.smoothing)
    steps = creation_steps(recipe, {"source": "random", "samples": 4, "seqlen": 16}, report)
    assert any(s.startswith("Smoothing: SmoothQuant (strength 0.8) on 4 mappings in 2 decoder layers") for s in steps)

    # llm-compressor's own W8A8 test recipe on an MoE model: the router also reads the MLP's norm, so the mapping
    # is completed with it, and the card says so
    model = _model("hunyuan_v1_moe")
    recipe = Recipe.from_yaml(SQ_W8A8 % ", mappings: [[['re:.*gate_proj', 're:.*up_proj'], "
                                        "'re:.*post_attention_layernorm']]")
    report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=256))
    steps = creation_steps(recipe, {"source": "random", "samples": 4, "seqlen": 16}, report)
    assert any("completed with modules that also read the smoothed norm" in s for s in steps), steps


def test_a_recipe_mapping_whose_fold_would_change_the_layer_is_refused_naming_the_mappings():
    model = _model("minimax")
    recipe = Recipe.from_yaml(SQ_W8A8 % ', mappings: [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], '
                                         '"re:.*input_layernorm"]]')
    with pytest.raises(RecipeError) as exc:
        compress_model(model, recipe, random_calibration(n=2, length=16, vocab=256))
    assert exc.value.field.endswith(".mappings") and "changes MiniMaxDecoderLayer's output" in exc.value.message


def test_experts_held_as_3d_weights_the_engine_cannot_split_are_refused_not_left_16_bit():
    from compression.errors import UnsupportedModelError
    from compression.preflight import preflight

    # JetMoE's ParallelExperts: compressing around them would quantize its routers and leave the experts alone
    config = AutoConfig.for_model("jetmoe", **{**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2,
                                               "kv_channels": 16})
    with pytest.raises(RecipeError) as exc:
        preflight(config, Recipe.from_preset("FP8_DYNAMIC"))
    assert exc.value.field == "model" and "JetMoeParallelExperts" in exc.value.message
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="cannot split"):
        compress_model(model, Recipe.from_preset("FP8_DYNAMIC"), None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
