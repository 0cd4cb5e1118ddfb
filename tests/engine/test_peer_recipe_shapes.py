"""Issue 13's promise: recipes written for llm-compressor 0.14 (their YAML shapes and options, the
scheme presets of compressed-tensors) parse here, run on dense and MoE decoder models, and export
a checkpoint whose quantization_config compressed-tensors reads; what the engine cannot honour is
refused with a RecipeError naming the field. The recipes are our own, written in the shapes
llm-compressor's examples and tests use."""
from __future__ import annotations

import json

import pytest
import torch

from compression.errors import RecipeError
from compression.model_io.export import export_checkpoint
from compression.model_io.runtime import load_compressed_model
from compression.preflight import preflight
from compression.recipe import SCHEME_PRESETS, Recipe, matches_any
from compression.sequential import compress_model
from tests.engine.conftest import random_calibration
from tests.tiny import tiny_family_config, tiny_family_model, tiny_llama, tiny_llama_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 2048


def q(body: str, stage: str = "quant_stage", group: str = "quant_modifiers") -> str:
    """One stage holding ``body`` (modifier lines indented by four spaces)."""
    return f"{stage}:\n  {group}:\n" + "".join(f"    {line}\n" for line in body.strip("\n").split("\n"))


# -- shapes the parser accepts --------------------------------------------------------------------
ACCEPTED = {
    "preset, targets as a string": q("GPTQModifier: {targets: Linear, scheme: W4A16, ignore: [lm_head]}"),
    "preset name in lower case": q("QuantizationModifier: {scheme: fp8_dynamic, ignore: [lm_head]}"),
    "ignore as a string, actorder weight": q("GPTQModifier: {scheme: W4A16_ASYM, ignore: lm_head, actorder: weight}"),
    "no ignore given": q("GPTQModifier: {scheme: W8A8}"),
    "MoE router regex": q("QuantizationModifier: {targets: [Linear], scheme: FP8_DYNAMIC, "
                          "ignore: [lm_head, 're:.*mlp.gate$']}"),
    "scheme dict form": q("QuantizationModifier: {scheme: {W4A16: [Linear]}, ignore: [lm_head]}"),
    "scheme dict, two presets": q("QuantizationModifier:\n  scheme: {W4A16: ['re:.*self_attn.*'], "
                                  "FP8_DYNAMIC: ['re:.*mlp.*']}\n  ignore: [lm_head]"),
    "config group, every field spelled out": q("""
QuantizationModifier:
  ignore: [lm_head]
  config_groups:
    group_0:
      targets: [Linear]
      weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128, dynamic: false,
                actorder: null, observer: minmax, observer_kwargs: {}, block_structure: null, scale_dtype: null,
                zp_dtype: null}
      input_activations: null
      output_activations: null
      format: pack-quantized"""),
    # llm-compressor 0.14's own tests/e2e/recipes/NVFP4_FP8/recipe_moe_nvfp4_fp8_rtn.yaml: symmetric schemes
    # naming the zero-point dtype compressed-tensors records for them (no zero point is stored)
    "zp_dtype on symmetric schemes": q("""
QuantizationModifier:
  ignore: [lm_head]
  config_groups:
    fp8_block:
      targets: ['re:.*self_attn.*']
      weights: {num_bits: 8, type: float, strategy: block, block_structure: [128, 128], symmetric: true,
                zp_dtype: float8_e4m3fn}
      input_activations: {num_bits: 8, type: float, strategy: group, group_size: 128, dynamic: true,
                          symmetric: true, zp_dtype: float8_e4m3fn}
    int4: {targets: ['re:.*mlp.*'], weights: {num_bits: 4, type: int, strategy: group, group_size: 64,
                                            symmetric: true, zp_dtype: int8}}"""),
    "bare num_bits activations": q("""
GPTQModifier:
  block_size: 128
  dampening_frac: 0.01
  config_groups:
    group_0: {targets: [Linear], weights: {num_bits: 8}, input_activations: {num_bits: 8}}""",
                                   group="obcq_modifiers"),
    "static minmax observer on activations": q("""
GPTQModifier:
  ignore: [lm_head]
  actorder: null
  config_groups:
    group_0:
      targets: [Linear]
      weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
      input_activations: {num_bits: 8, type: int, symmetric: false, strategy: tensor, dynamic: false,
                          observer: static_minmax}"""),
    "actorder false in the group, null on GPTQ": q("""
GPTQModifier:
  ignore: [lm_head]
  actorder: null
  config_groups:
    group_0: {targets: [Linear], weights: {num_bits: 4, type: int, strategy: channel, actorder: false}}"""),
    "actorder true": q("GPTQModifier: {scheme: W4A16, actorder: true, ignore: [lm_head]}"),
    "kv cache only": q("QuantizationModifier:\n  kv_cache_scheme: {num_bits: 8, type: float, symmetric: true, "
                       "strategy: tensor}"),
    "QuantizationModifier then GPTQModifier without scheme": q("""
QuantizationModifier:
  ignore: [lm_head, model.layers.0.mlp.down_proj]
  config_groups:
    group_0:
      targets: [Linear]
      weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 128, actorder: weight}
      input_activations: null
      output_activations: null
GPTQModifier: {block_size: 128}""", stage="test_stage"),
    "observer dict and weight_observer": q("QuantizationModifier: {scheme: W4A16, ignore: [lm_head], "
                                           "observer: {weights: mse}}"),
    "GPTQ serializer fields": q("GPTQModifier: {scheme: W4A16, ignore: [lm_head], batched_quantization: auto, "
                                "offload_hessians: false, dampening_frac: null, bypass_divisibility_checks: false}"),
    "modifier base fields": q("QuantizationModifier: {scheme: FP8_DYNAMIC, ignore: [lm_head], index: 0, "
                              "group: quant, start: -1, end: -1, update: null, requires_calibration_data: false}"),
    "SmoothQuant mappings, algorithm and steps": q("""
SmoothQuantModifier:
  smoothing_strength: 0.8
  algorithm: smoothquant
  num_calibration_steps: 4
  calibration_function: null
  mappings:
  - - ['re:.*q_proj', 're:.*k_proj', 're:.*v_proj']
    - re:.*input_layernorm
  - - ['re:.*gate_proj', 're:.*up_proj']
    - re:.*post_attention_layernorm
GPTQModifier: {targets: [Linear], ignore: [lm_head], scheme: W8A8}"""),
    "AWQ mappings and options": q("""
AWQModifier:
  duo_scaling: both
  n_grid: 10
  offload_device: cpu
  mappings:
    - smooth_layer: re:.*input_layernorm$
      balance_layers: ['re:.*q_proj$', 're:.*k_proj$', 're:.*v_proj$']
      activation_hook_target: null
QuantizationModifier: {ignore: [lm_head], scheme: W4A16_ASYM, targets: [Linear]}"""),
    "SparseGPT in an obcq stage": q("SparseGPTModifier: {sparsity: 0.5, mask_structure: '2:4', targets: [Linear], "
                                    "ignore: ['re:.*lm_head']}", stage="pruning_stage", group="obcq_modifiers"),
    "SparseGPT serializer fields": q("SparseGPTModifier: {sparsity: 0.5, mask_structure: '2:4', "
                                     "sequential_update: false, offload_hessians: false, preserve_sparsity_mask: "
                                     "false, block_size: 128, dampening_frac: 0.01, ignore: [lm_head]}"),
    "a stage with run_type and two modifier groups": (
        "version: 1.1.0\nquant_stage:\n  run_type: oneshot\n  smoothing_modifiers:\n"
        "    SmoothQuantModifier: {smoothing_strength: 0.5}\n  quant_modifiers:\n"
        "    GPTQModifier: {scheme: W8A8, ignore: [lm_head]}\n"),
    "llm-compressor's saved recipe.yaml": (
        "default_stage:\n  default_modifiers:\n"
        "    AWQModifier: {requires_calibration_data: true, duo_scaling: both, n_grid: 20}\n"
        "    QuantizationModifier: {targets: [Linear], ignore: [lm_head], scheme: W4A16_ASYM, "
        "bypass_divisibility_checks: false, requires_calibration_data: false}\n"),
    "LogarithmicEqualizationModifier": q("LogarithmicEqualizationModifier: {}\n"
                                         "QuantizationModifier: {scheme: W8A8, ignore: [lm_head]}"),
    "Wanda": q("WandaPruningModifier: {sparsity: 0.5, mask_structure: '0:0', targets: [Linear], ignore: [lm_head]}",
               stage="sparsity_stage", group="sparsity_modifiers"),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_llm_compressor_shapes_parse_and_round_trip(name):
    recipe = Recipe.from_yaml(ACCEPTED[name])
    assert recipe.modifiers and recipe.describe()
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("scheme", [s for s in SCHEME_PRESETS if s != "UNQUANTIZED"])
def test_every_supported_scheme_preset_parses_to_compressed_tensors_values(scheme):
    recipe = Recipe.from_yaml(q(f"QuantizationModifier: {{scheme: {scheme}, ignore: [lm_head]}}"))
    group = recipe.modifiers[0].config_groups["group_0"]
    preset = SCHEME_PRESETS[scheme]
    for field in ("num_bits", "type", "symmetric", "strategy", "group_size"):
        assert getattr(group.weights, field) == preset["weights"].get(field, getattr(group.weights, field))
    assert (group.input_activations is None) == (preset["input_activations"] is None)


def test_preset_values_follow_compressed_tensors():
    w8a16 = Recipe.from_yaml(q("QuantizationModifier: {scheme: W8A16}")).modifiers[0].config_groups["group_0"]
    assert (w8a16.weights.num_bits, w8a16.weights.strategy, w8a16.weights.group_size) == (8, "group", 128)
    w4afp8 = Recipe.from_yaml(q("QuantizationModifier: {scheme: W4AFP8}")).modifiers[0].config_groups["group_0"]
    assert (w4afp8.weights.type, w4afp8.weights.num_bits, w4afp8.input_activations.type) == ("int", 4, "float")


def test_defaults_and_notes_say_what_differs_from_a_literal_reading():
    sparse = Recipe.from_yaml(q("SparseGPTModifier: {sparsity: 0.6, ignore: [lm_head]}"))
    assert sparse.modifiers[0].mask_structure == "0:0"  # llm-compressor's default: unstructured
    notes = Recipe.from_yaml(ACCEPTED["a stage with run_type and two modifier groups"]).notes
    assert any("run_type" in n for n in notes) and any("'version'" in n for n in notes)
    assert any("lm_head" in n for n in Recipe.from_yaml(ACCEPTED["no ignore given"]).notes)
    base = Recipe.from_yaml(ACCEPTED["modifier base fields"])
    assert any("start/end" in n for n in base.notes) and base.modifiers[0].extra["start"] == -1
    two_groups = Recipe.from_yaml(ACCEPTED["a stage with run_type and two modifier groups"])
    assert list(two_groups.stage_dict()["quant_stage"]) == ["smoothing_modifiers", "quant_modifiers"]
    # a GPTQModifier reusing a QuantizationModifier's scheme reuses its ignore list: no lm_head note
    inherited = Recipe.from_yaml(ACCEPTED["QuantizationModifier then GPTQModifier without scheme"])
    assert not any("lm_head" in n for n in inherited.notes)
    assert Recipe.from_yaml(ACCEPTED["LogarithmicEqualizationModifier"]).modifiers[0].algorithm == "log_equalization"


# -- shapes refused, naming the field ---------------------------------------------------------------
REFUSED = [
    (q("QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 4, symmetric: true, "
       "strategy: group, group_size: 64, zp_dtype: float8_e4m3fn}}}}"),
     "stages[0].modifiers[0].config_groups.g.weights.zp_dtype", "or int8"),
    (q("QuantizationModifier: {scheme: MXFP6A16, ignore: [lm_head]}"), "stages[0].modifiers[0].scheme", "FP6"),
    (q("QuantizationModifier: {scheme: W9A9}"), "stages[0].modifiers[0].scheme", "W4A16"),
    (q("QuantizationModifier:\n  config_groups:\n    g: {targets: [Linear], weights: {num_bits: 8, type: int, "
       "strategy: group, group_size: 32, scale_dtype: uint8}}"),
     "stages[0].modifiers[0].config_groups.g.weights.scale_dtype", "MX"),
    (q("QuantizationModifier:\n  config_groups:\n    g: {targets: [Linear], weights: {num_bits: 4, type: float, "
       "strategy: group, group_size: 16, scale_dtype: uint8}}"),
     "stages[0].modifiers[0].config_groups.g.weights.group_size", "32"),
    (q("QuantizationModifier:\n  config_groups:\n    attention: {targets: [LlamaAttention], input_activations: "
       "{num_bits: 8, type: float, strategy: tensor}}"),
     "stages[0].modifiers[0].config_groups.attention.weights", "activation-only"),
    (q("QuantizationModifier:\n  config_groups:\n    g: {targets: [Linear], weights: {num_bits: 8, type: float}, "
       "output_activations: {num_bits: 8, type: float}}"),
     "stages[0].modifiers[0].config_groups.g.output_activations", "output"),
    (q("QuantizationModifier:\n  config_groups:\n    g: {targets: [Linear], weights: {num_bits: 4, strategy: group, "
       "group_size: 128}, format: naive-quantized}"), "stages[0].modifiers[0].config_groups.g.format", "pack-quantized"),
    (q("QuantizationModifier: {scheme: FP8_DYNAMIC, kv_cache_scheme: {num_bits: 8, type: float, "
       "strategy: channel}}"), "stages[0].modifiers[0].kv_cache_scheme.strategy", "attn_head"),
    (q("QuantizationModifier: {scheme: W4A16, bypass_divisibility_checks: true}"),
     "stages[0].modifiers[0].bypass_divisibility_checks", "divisibility"),
    (q("GPTQModifier:\n  actorder: null\n  config_groups:\n    g: {targets: [Linear], weights: {num_bits: 4, "
       "strategy: channel, actorder: weight}}"), "stages[0].modifiers[0].actorder", "clashes"),
    (q("GPTQModifier: {scheme: W4A16, batched_quantization: 0}"),
     "stages[0].modifiers[0].batched_quantization", "positive"),
    (q("SmoothQuantModifier: {algorithm: rotate}\nGPTQModifier: {scheme: W8A8}"),
     "stages[0].modifiers[0].algorithm", "log_equalization"),
    (q("SmoothQuantModifier: {calibration_function: my.module.fn}\nGPTQModifier: {scheme: W8A8}"),
     "stages[0].modifiers[0].calibration_function", "callable"),
    (q("SparseGPTModifier: {sparsity: 0.5, mask_structure: '4:2'}"),
     "stages[0].modifiers[0].mask_structure", "N:M"),
    (q("SparseGPTModifier: {sparsity: 0.5, mask_structure: '1:4'}"), "stages[0].modifiers[0].sparsity", "0.25"),
    (q("SparseGPTModifier: {sparsity: [0.5, 0.6], mask_structure: '2:4'}"), "stages[0].modifiers[0].sparsity",
     "unstructured"),
    (q("SparseGPTModifier: {sparsity: 0.5, sparsity_profile: owl, owl_m: 5}"),
     "stages[0].modifiers[0].sparsity_profile", "owl_lmbda"),
    (q("QuantizationModifier: {scheme: FP8_DYNAMIC}\nAWQModifier: {}"), "stages[0].modifiers[1]", "mappings"),
    (q("AWQModifier: {}"), "stages[0].modifiers[0]", "after it"),
    (q("GPTQModifier: {scheme: W8A8}") + q("SparseGPTModifier: {sparsity: 0.5}", stage="sparsity_stage"),
     "stages[1].modifiers[0]", "before"),  # in one stage it is reordered instead (test below)
    (q("QuIPModifier: {rotations: [v, u]}"), "stages[0].modifiers[0]", "QuIP"),
    (q("AutoRoundModifier: {iters: 200}"), "stages[0].modifiers[0]", "scheme"),
    (q("QuantizationModifier: {scheme: W4A16, start: soon}"), "stages[0].modifiers[0].start", "number"),
    ("quant_stage:\n  run_type: oneshot\n  quant_modifers:\n    QuantizationModifier: {scheme: W4A16}\n",
     "stages[0].quant_modifers", "_modifiers"),
    ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: W4A16}\n  extras: {a: 1}\n",
     "stages[0].extras", "_modifiers"),
]


@pytest.mark.parametrize("text, field, hint", REFUSED)
def test_what_the_engine_cannot_honour_is_refused_with_the_field(text, field, hint):
    with pytest.raises(RecipeError) as exc:
        Recipe.from_yaml(text)
    assert exc.value.field == field and hint in exc.value.message, str(exc.value)


# -- end to end: compress, export, load ---------------------------------------------------------------
def _check_checkpoint(model, recipe, report, out_dir, formats: set[str] | None = None) -> dict:
    """Export; the quantization_config validates as compressed-tensors' QuantizationConfig, each group's
    format is the one compressed-tensors infers for its scheme, and our runtime reproduces the logits."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(ids).logits
    export_checkpoint(model, None, recipe, report, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    qc = config.get("quantization_config")
    if qc is not None:
        assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
        QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "version"})
        found = set()
        for group in qc["config_groups"].values():
            scheme = QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})
            fmt = infer_module_format(torch.nn.Linear, scheme).value
            assert group.get("format", qc["format"]) == fmt
            found.add(fmt)
        if formats is not None:
            assert found == formats
        assert all(matches_any(qc["ignore"], r, "Linear") for r in report.routers)  # routers stay 16-bit
    loaded = load_compressed_model(out_dir)
    with torch.no_grad():
        theirs = loaded(ids).logits
    assert float((theirs - ours).abs().max()) <= 1e-2 * float(ours.abs().max())
    return config


E2E_DENSE = {
    "W4A16 GPTQ, targets as a string": (ACCEPTED["preset, targets as a string"], {"pack-quantized"}),
    "W8A16 (int8 group 128, packed)": (q("GPTQModifier: {targets: Linear, scheme: W8A16, ignore: [lm_head]}"),
                                        {"pack-quantized"}),
    "W3A16 (3-bit codes straddle int32 words)": (q("QuantizationModifier: {scheme: W3A16, ignore: [lm_head]}"),
                                                 {"pack-quantized"}),
    "W4AFP8": (q("GPTQModifier: {targets: Linear, scheme: W4AFP8, ignore: [lm_head]}"), {"int-quantized"}),
    "W4A4": (q("QuantizationModifier: {scheme: W4A4, ignore: [lm_head]}"), {"int-quantized"}),
    "NVFP4 + FP8 per-group targets": (q("""
QuantizationModifier:
  ignore: [lm_head]
  config_groups:
    group_0:
      weights: {num_bits: 8, type: float, strategy: channel, dynamic: false, symmetric: true}
      input_activations: {num_bits: 8, type: float, strategy: token, dynamic: true, symmetric: true}
      targets: ['re:.*\\.down_proj$']
    group_1:
      weights: {num_bits: 4, type: float, strategy: tensor_group, dynamic: false, symmetric: true, group_size: 16,
                scale_dtype: float8_e4m3fn}
      input_activations: {num_bits: 4, type: float, strategy: tensor_group, dynamic: local, symmetric: true,
                          group_size: 16}
      targets: ['re:.*self_attn\\.(k|o|q|v)_proj$', 're:.*\\.(gate|up)_proj$']"""),
                                      {"float-quantized", "nvfp4-pack-quantized"}),
    "QuantizationModifier then GPTQModifier": (ACCEPTED["QuantizationModifier then GPTQModifier without scheme"],
                                               {"pack-quantized"}),
    "SmoothQuant mappings + static asymmetric INT8": (ACCEPTED["static minmax observer on activations"]
                                                      .replace("quant_modifiers:\n", "quant_modifiers:\n"
                                                               "    SmoothQuantModifier: {smoothing_strength: 0.8}\n"),
                                                      {"int-quantized"}),
    "kv cache only": (ACCEPTED["kv cache only"], None),
    "FP8_DYNAMIC + per-head KV cache": (q("QuantizationModifier:\n  targets: Linear\n  scheme: FP8_DYNAMIC\n"
                                          "  ignore: [lm_head]\n  kv_cache_scheme: {num_bits: 8, type: float, "
                                          "strategy: attn_head}"), {"float-quantized"}),
    "GPTQ, then AWQ on the MLP only, then RTN W4A16": (q("""
GPTQModifier: {targets: 're:.*self_attn\\.(k|q|o|v)_proj$', scheme: W8A8}
AWQModifier:
  mappings:
    - {smooth_layer: 're:.*post_attention_layernorm$', balance_layers: ['re:.*gate_proj$', 're:.*up_proj$']}
    - {smooth_layer: 're:.*up_proj$', balance_layers: ['re:.*down_proj$']}
QuantizationModifier: {targets: 're:.*mlp\\.(down|gate|up)_proj$', scheme: W4A16}"""),
                                                        {"int-quantized", "pack-quantized"}),
    "UNQUANTIZED group beside W4A16": (q("QuantizationModifier:\n  scheme: {UNQUANTIZED: ['re:.*down_proj$'], "
                                         "W4A16: [Linear]}\n  ignore: [lm_head]"), {"pack-quantized"}),
    "INT8 per-token-group activations": (q("QuantizationModifier:\n  ignore: [lm_head]\n  config_groups:\n"
                                           "    g: {targets: [Linear], weights: {num_bits: 8, strategy: channel}, "
                                           "input_activations: {num_bits: 8, strategy: group, group_size: 32, "
                                           "dynamic: true}}"), {"int-quantized"}),
    "saved llm-compressor recipe (AWQ + W4A16_ASYM)": (ACCEPTED["llm-compressor's saved recipe.yaml"],
                                                       {"pack-quantized"}),
    "log equalization + W8A8": (ACCEPTED["LogarithmicEqualizationModifier"], {"int-quantized"}),
    "MXFP4 (E8M0 scales, FP4 activations)": (q("QuantizationModifier: {targets: Linear, scheme: MXFP4, "
                                                "ignore: [lm_head]}"), {"mxfp4-pack-quantized"}),
    "GPTQ MXFP4A16": (q("GPTQModifier: {targets: Linear, scheme: MXFP4A16, ignore: [lm_head]}"),
                      {"mxfp4-pack-quantized"}),
    "MXFP8": (q("QuantizationModifier: {scheme: MXFP8, ignore: [lm_head]}"), {"mxfp8-quantized"}),
    "Wanda 2:4 + FP8_DYNAMIC": (q("WandaPruningModifier: {sparsity: 0.5, mask_structure: '2:4', ignore: [lm_head]}",
                                  stage="sparsity_stage", group="sparsity_modifiers")
                                + q("QuantizationModifier: {scheme: FP8_DYNAMIC, ignore: [lm_head]}"),
                                {"float-quantized"}),
}


@pytest.mark.parametrize("name", list(E2E_DENSE))
def test_dense_llama_runs_and_exports(name, tmp_path):
    text, formats = E2E_DENSE[name]
    recipe = Recipe.from_yaml(text)
    model = tiny_llama(vocab=VOCAB)
    preflight(tiny_llama_config(vocab=VOCAB), recipe)  # what submission checks agrees with the engine
    report = compress_model(model, recipe, random_calibration(n=3, length=16, vocab=VOCAB))
    config = _check_checkpoint(model, recipe, report, tmp_path, formats)
    if name == "kv cache only":
        assert config["quantization_config"]["kv_cache_scheme"]["strategy"] == "tensor" and report.kv_scales
    if "per-head" in name:  # compressed-tensors' attn_head scales: [kv heads, 1, 1]
        assert config["quantization_config"]["kv_cache_scheme"]["strategy"] == "attn_head"
        k_scale = report.kv_scales["model.layers.0.self_attn.k_scale"]
        assert k_scale.shape == (2, 1, 1) and k_scale[0] != k_scale[1]
    if name.startswith("UNQUANTIZED"):
        assert not [n for n in report.modules if n.endswith("down_proj")] and len(report.modules) == 12
        assert "model.layers.0.mlp.down_proj" in config["quantization_config"]["ignore"]


def test_pruning_targets_naming_layers_preserve_masks_and_per_layer_sparsities(tmp_path):
    model = tiny_llama(vocab=VOCAB)
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight[:, ::8] = 0.0  # an existing pattern that preserve_sparsity_mask keeps
    before = down.weight == 0
    text = q("SparseGPTModifier: {sparsity: 0.7, block_size: 128, dampening_frac: 0.01, mask_structure: '0:0', "
             "targets: ['re:.*model.layers.0$'], preserve_sparsity_mask: true}", stage="test_stage",
             group="obcq_modifiers")
    report = compress_model(model, Recipe.from_yaml(text), random_calibration(n=3, length=16, vocab=VOCAB))
    assert {n.split(".")[2] for n in report.modules} == {"0"}  # every Linear of layer 0, nothing else
    assert all(abs(r.sparsity - 0.7) < 0.02 for r in report.modules.values())
    assert bool((down.weight[before] == 0).all())
    config = _check_checkpoint(model, Recipe.from_yaml(text), report, tmp_path)
    assert config["quantization_config"]["sparsity_config"]["sparsity_structure"] == "unstructured"

    listed = q("SparseGPTModifier: {sparsity: [0.3, 0.6], mask_structure: '0:0', "
               "targets: ['model.layers.0', 'model.layers.1']}", stage="sparsity_stage", group="sparsity_modifiers")
    report = compress_model(tiny_llama(vocab=VOCAB), Recipe.from_yaml(listed),
                            random_calibration(n=3, length=16, vocab=VOCAB))
    by_layer = {i: [r.sparsity for n, r in report.modules.items() if n.startswith(f"model.layers.{i}.")]
                for i in (0, 1)}
    assert all(abs(s - 0.3) < 0.02 for s in by_layer[0]) and all(abs(s - 0.6) < 0.02 for s in by_layer[1])
    with pytest.raises(RecipeError) as exc:
        compress_model(tiny_llama(vocab=VOCAB), Recipe.from_yaml(listed.replace("[0.3, 0.6]", "[0.3, 0.6, 0.5]")),
                       random_calibration(n=3, length=16, vocab=VOCAB))
    assert exc.value.field == "stages[0].modifiers[0].sparsity" and "3 sparsities for 2 modules" in exc.value.message


def test_n_of_m_masks_and_owl_layer_sparsities():
    text = q("SparseGPTModifier: {sparsity: 0.5, mask_structure: '4:8', ignore: [lm_head]}")
    model = tiny_llama(vocab=VOCAB)
    compress_model(model, Recipe.from_yaml(text), random_calibration(n=3, length=16, vocab=VOCAB))
    w = model.model.layers[1].mlp.up_proj.weight
    assert bool(((w == 0).reshape(w.shape[0], -1, 8).sum(-1) >= 4).all())  # 4 of every 8 pruned

    owl = q("SparseGPTModifier: {sparsity: 0.5, sparsity_profile: owl, owl_m: 2, owl_lmbda: 0.1, "
            "ignore: [lm_head]}")
    events = []
    report = compress_model(tiny_llama(vocab=VOCAB, layers=3), Recipe.from_yaml(owl),
                            random_calibration(n=3, length=16, vocab=VOCAB), progress=events.append)
    per_layer = [sum(r.sparsity for n, r in report.modules.items() if n.startswith(f"model.layers.{i}."))
                 / sum(1 for n in report.modules if n.startswith(f"model.layers.{i}.")) for i in range(3)]
    assert max(per_layer) - min(per_layer) > 0.05  # layers get different sparsities
    assert abs(sum(per_layer) / 3 - 0.5) < 0.02 and all(0.3 - 1e-6 <= s <= 0.7 + 1e-6 for s in per_layer)
    assert sum(1 for e in events if e.get("kind") == "owl") == 3


def test_a_transform_may_not_rescale_what_an_earlier_modifier_quantized():
    text = q("""
GPTQModifier: {targets: 're:.*self_attn\\.(k|q|o|v)_proj$', scheme: W8A8, ignore: [lm_head]}
AWQModifier:
  mappings:
    - {smooth_layer: 're:.*input_layernorm$', balance_layers: ['re:.*q_proj$', 're:.*k_proj$', 're:.*v_proj$']}
QuantizationModifier: {targets: 're:.*mlp\\.(down|gate|up)_proj$', scheme: W4A16}""")
    with pytest.raises(RecipeError) as exc:
        compress_model(tiny_llama(vocab=VOCAB), Recipe.from_yaml(text), random_calibration(n=2, length=16,
                                                                                             vocab=VOCAB))
    assert exc.value.field == "stages[0].modifiers[1].mappings" and "q_proj" in exc.value.message


def test_embedding_targets_are_refused_before_any_work():
    embedding = q("""
QuantizationModifier:
  ignore: [lm_head]
  config_groups:
    group_0: {targets: [Linear], weights: {num_bits: 8, type: int, symmetric: true, strategy: tensor}}
    group_1: {targets: [Embedding], weights: {num_bits: 8, type: int, symmetric: true, strategy: tensor}}""")
    recipe = Recipe.from_yaml(embedding)
    for run in (lambda: preflight(tiny_llama_config(vocab=VOCAB), recipe),
                lambda: compress_model(tiny_llama(vocab=VOCAB), recipe, None)):
        with pytest.raises(RecipeError) as exc:
            run()
        assert exc.value.field == "stages[0].modifiers[0].config_groups.group_1.targets"


@pytest.mark.parametrize("body", [
    "GPTQModifier: {scheme: W4A16, ignore: []}",  # llm-compressor's default: every Linear, lm_head included
    "QuantizationModifier: {scheme: FP8, targets: ['re:.*lm_head', 're:.*self_attn.*'], ignore: []}",
])
def test_the_lm_head_is_compressed_when_the_recipe_leaves_it_in(body, tmp_path):
    """The head's inputs are the last layer's outputs through the final norm; a tied head is untied
    (llm-compressor does the same), the embedding keeps its dense weight."""
    model = tiny_family_model("qwen3", hidden_size=128, intermediate_size=256, head_dim=32, tie_word_embeddings=True)
    embedding = model.model.embed_tokens.weight.detach().clone()
    recipe = Recipe.from_yaml(q(body))
    preflight(tiny_family_config("qwen3", hidden_size=128, intermediate_size=256, head_dim=32,
                                 tie_word_embeddings=True), recipe)
    report = compress_model(model, recipe, random_calibration(n=3, length=16, vocab=model.config.vocab_size))
    assert "lm_head" in report.modules and report.modules["lm_head"].codes is not None
    assert set(report.modules["lm_head"].losses) == ({"gptq"} if "GPTQ" in body else {"rtn"})
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    config = _check_checkpoint(model, recipe, report, tmp_path)
    assert config["tie_word_embeddings"] is False and "lm_head" not in config["quantization_config"]["ignore"]
    assert not any("lm_head" in n for n in recipe.notes)
    assert any("lm_head" in n for n in Recipe.from_yaml(q("GPTQModifier: {scheme: W4A16}")).notes)


def _moe(family: str):
    sizes = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, head_dim=32)
    return tiny_family_model(family, **sizes), tiny_family_config(family, **sizes)


E2E_MOE = {
    ("qwen3_moe", "AWQ default mappings + W4A16, router ignored"): q("""
AWQModifier: {}
QuantizationModifier: {scheme: W4A16, targets: [Linear], ignore: [lm_head, 're:.*mlp.gate$']}"""),
    ("qwen3_moe", "FP8_BLOCK"): q("QuantizationModifier: {targets: Linear, scheme: FP8_BLOCK, "
                                  "ignore: [lm_head, 're:.*mlp.gate$']}"),
    ("qwen3_moe", "GPTQ NVFP4"): q("GPTQModifier: {targets: [Linear], scheme: NVFP4, ignore: [lm_head]}"),
    ("qwen3_moe", "SparseGPT 2:4 on the decoder layers + W8A8"): (
        q("SparseGPTModifier: {sparsity: 0.5, mask_structure: '2:4', targets: ['re:model.layers.\\d+$']}",
          stage="sparsity_stage", group="sparsity_modifiers")
        + q("GPTQModifier: {scheme: W8A8, ignore: [lm_head, 're:.*mlp.gate$']}")),
    ("qwen3_moe", "AWQ + MXFP4A16"): q("AWQModifier: {duo_scaling: false}\n"
                                      "QuantizationModifier: {scheme: MXFP4A16, ignore: [lm_head, 're:.*mlp.gate$']}"),
    ("mixtral", "FP8 static, router regex"): q("QuantizationModifier: {scheme: FP8, targets: Linear, "
                                               "ignore: [lm_head, 're:.*mlp.gate']}"),
    ("mixtral", "SmoothQuant + W8A8 GPTQ"): q("SmoothQuantModifier: {smoothing_strength: 0.8}\n"
                                              "GPTQModifier: {targets: Linear, scheme: W8A8, ignore: [lm_head]}"),
}


@pytest.mark.parametrize("family, name", list(E2E_MOE))
def test_moe_models_run_and_export(family, name, tmp_path):
    recipe = Recipe.from_yaml(E2E_MOE[(family, name)])
    model, config = _moe(family)
    preflight(config, recipe)
    report = compress_model(model, recipe, random_calibration(n=3, length=32, vocab=model.config.vocab_size))
    assert report.experts and report.routers
    assert not any(r in report.modules for r in report.routers)
    _check_checkpoint(model, recipe, report, tmp_path)
    if name.startswith("AWQ"):
        # up_proj → down_proj is resolved expert by expert (compressed-tensors' match_modules_set)
        pairs = [e for e in report.smoothing if e["smooth_layer"].endswith("up_proj")]
        assert len(pairs) == 2 * 4 and all(len(e["balance_layers"]) == 1 for e in pairs)
        assert pairs[0]["balance_layers"][0] == pairs[0]["smooth_layer"].replace("up_proj", "down_proj")


def test_int_codes_of_every_width_pack_like_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from kernels.packing import pack_int, unpack_int

    gen = torch.Generator().manual_seed(0)
    for bits in range(2, 9):
        for cols in (5, 32, 45, 128):
            codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (3, cols), generator=gen).to(torch.int8)
            packed = pack_int(codes, bits)
            assert torch.equal(packed, pack_to_int32(codes, bits)), (bits, cols)
            assert torch.equal(unpack_int(packed, cols, bits), codes)


def test_mx_scales_and_values_equal_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    from compression.algorithms.quant import compute_qparams, fake_quantize, mx_exponents, mx_from_exponents

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen) * torch.rand(64, 1, generator=gen) * 3
    w[0, :32] = 0.0  # an all-zero group
    for scheme in ("MXFP4A16", "MXFP8A16"):
        ours = Recipe.from_yaml(q(f"QuantizationModifier: {{scheme: {scheme}}}")).modifiers[0] \
            .config_groups["group_0"].weights
        theirs = QuantizationArgs(**{**ours.checkpoint_dict(), "scale_dtype": torch.uint8, "observer": None})
        groups = w.reshape(64, 4, 32)
        ct_scale, ct_zp = calculate_qparams(groups.amin(-1), groups.amax(-1), theirs)
        scale, _ = compute_qparams(w, ours)
        assert torch.equal(scale, ct_scale.float())
        assert torch.equal(mx_from_exponents(mx_exponents(scale)), scale)  # the uint8 exponents are exact
        assert torch.equal(fake_quantize(w, scale, ours), ct_fake_quantize(w, ct_scale, ct_zp, theirs).float())


@pytest.mark.parametrize("scheme", ["MXFP4A16", "MXFP8", "W8A16", "W3A16", "W4AFP8", "W4A4", "KV_HEAD"])
def test_transformers_loads_the_new_formats(scheme, tmp_path):
    """transformers + compressed-tensors 0.20 read these checkpoints (MX decompresses to bfloat16, so
    those run in bfloat16 and are compared on average, as the NVFP4 export test does)."""
    from transformers import AutoModelForCausalLM

    mx = scheme.startswith("MX")
    dtype = torch.bfloat16 if mx else torch.float32
    model = tiny_llama(vocab=VOCAB, dtype=dtype)
    kv = "kv_cache_scheme: {num_bits: 8, type: float, strategy: attn_head}, " if scheme == "KV_HEAD" else ""
    scheme = "FP8" if scheme == "KV_HEAD" else scheme
    recipe = Recipe.from_yaml(q(f"QuantizationModifier: {{{kv}scheme: {scheme}, ignore: [lm_head]}}"))
    report = compress_model(model, recipe, random_calibration(n=2, length=16, vocab=VOCAB))
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids).logits.float()
    export_checkpoint(model, None, recipe, report, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    with torch.no_grad():
        theirs = loaded(ids).logits.float()
    if mx:
        assert float((theirs - ours).abs().mean() / ours.abs().mean()) < 0.05
    else:
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_pruning_listed_after_quantization_in_one_stage_runs_first(tmp_path):
    """llm-compressor's own sparsegpt test recipe lists GPTQModifier before SparseGPTModifier in one stage;
    here the pruning runs first (with a note) and GPTQ keeps its mask, so the pruned weights are exact zeros
    of the INT8 grid. Across stages, pruning after quantization is still refused, naming the modifier."""
    text = q("GPTQModifier:\n  ignore: [lm_head]\n  config_groups:\n    group_0:\n"
             "      weights: {num_bits: 8, type: int, strategy: channel}\n      targets: [Linear]\n"
             "SparseGPTModifier: {sparsity: 0.5, block_size: 128, dampening_frac: 0.01, mask_structure: '0:0', "
             "targets: ['re:.*model.layers.0$']}", stage="test_stage", group="obcq_modifiers")
    recipe = Recipe.from_yaml(text)
    assert [m.kind for m in recipe.modifiers] == ["SparseGPTModifier", "GPTQModifier"]
    assert any("SparseGPTModifier listed after GPTQModifier runs before it" in n for n in recipe.notes)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    model = tiny_llama(vocab=VOCAB)
    report = compress_model(model, recipe, random_calibration(n=3, length=16, vocab=VOCAB))
    for name, record in report.modules.items():
        layer = name.split(".")[2]
        assert record.weights is not None and record.weights.num_bits == 8, name
        weight = model.get_submodule(name).weight
        zeros = float((weight == 0).float().mean())
        assert (abs(zeros - 0.5) < 0.02) if layer == "0" else zeros < 0.1, (name, zeros)
        if layer == "0":
            assert bool((record.codes[weight == 0] == 0).all())
    _check_checkpoint(model, recipe, report, tmp_path)

    two_stages = (q("GPTQModifier: {scheme: W8A16, ignore: [lm_head]}")
                  + q("SparseGPTModifier: {sparsity: 0.5, mask_structure: '2:4', ignore: [lm_head]}",
                      stage="sparsity_stage", group="sparsity_modifiers"))
    with pytest.raises(RecipeError) as exc:
        Recipe.from_yaml(two_stages)
    assert exc.value.field == "stages[1].modifiers[0]" and "before quantization" in exc.value.message
