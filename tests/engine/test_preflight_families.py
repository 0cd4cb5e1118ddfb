"""Pre-flight on every family's config: what the engine will target, and models/recipes it refuses."""
import pytest
import torch
from safetensors import safe_open

from compression.errors import RecipeError
from compression.preflight import model_layout, preflight
from compression.recipe import Recipe
from tests.tiny import FAMILIES, MOE_FAMILIES, tiny_family_config, tiny_family_model

ROUTER_SUFFIXES = (".gate.weight", ".gate.e_score_correction_bias", ".shared_expert_gate.weight")


def _layer_weight_names(family, tmp_path) -> set[str]:
    """What transformers itself writes for the decoder layers' Linears (2-D weights, routers left out)."""
    tiny_family_model(family).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        return {k.removesuffix(".weight") for k in f.keys() if ".layers." in k and k.endswith(".weight")
                and len(f.get_slice(k).get_shape()) == 2 and not k.endswith(ROUTER_SUFFIXES)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_preflight_targets_every_linear_and_expert_of_the_family(family, tmp_path):
    expected = _layer_weight_names(family, tmp_path)
    layout = model_layout(tiny_family_config(family))
    assert {s.name for s in layout.linears if s.layer is not None} == expected
    report = preflight(tiny_family_config(family), Recipe.from_preset("W4A16", group_size=32))
    assert report.targeted_modules == len(expected) and report.layers == 2
    assert (report.experts > 0) == (report.routers > 0) == (family in MOE_FAMILIES)
    assert report.params == sum(p.numel() for p in tiny_family_model(family).parameters())


def test_a_moe_recipe_may_leave_the_experts_out_by_their_checkpoint_names():
    cfg = tiny_family_config("mixtral")
    report = preflight(cfg, Recipe.from_preset("W4A16", group_size=32,
                                               ignore=["lm_head", "re:.*block_sparse_moe.experts.*"]))
    assert report.targeted_modules == 2 * 4  # attention only
    everything = preflight(cfg, Recipe.from_preset("W4A16", group_size=32))
    assert everything.targeted_modules == 2 * (4 + 4 * 3)


def test_fused_projections_are_one_target_matched_by_name():
    cfg = tiny_family_config("phi3")
    names = {s.local for s in model_layout(cfg).linears if s.layer == 0}
    assert names == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
    report = preflight(cfg, Recipe.from_preset("FP8_DYNAMIC", ignore=["lm_head", "re:.*qkv_proj$"]))
    assert report.targeted_modules == 2 * 3


def test_a_recipe_whose_targets_match_nothing_is_refused_with_the_field_and_examples():
    recipe = Recipe.from_dict({"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
        "targets": ["re:.*does_not_exist$"], "ignore": ["lm_head"], "scheme": "FP8_DYNAMIC"}}}})
    with pytest.raises(RecipeError) as exc:
        preflight(tiny_family_config("qwen3_moe"), recipe)
    assert exc.value.field == "stages[0].modifiers[0].targets"
    assert "matches no Linear" in exc.value.message and "model.layers.0.mlp.experts.0.gate_proj" in exc.value.message


def test_routers_are_never_targets():
    recipe = Recipe.from_dict({"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
        "targets": ["re:.*mlp\\.gate$", "re:.*shared_expert_gate$"], "ignore": [], "scheme": "FP8_DYNAMIC"}}}})
    with pytest.raises(RecipeError) as exc:
        preflight(tiny_family_config("qwen2_moe"), recipe)
    assert exc.value.field == "stages[0].modifiers[0].targets"


def test_a_group_size_that_does_not_divide_an_expert_names_the_expert_projection():
    cfg = tiny_family_config("qwen3_moe", moe_intermediate_size=48)  # down_proj input 48
    with pytest.raises(RecipeError) as exc:
        preflight(cfg, Recipe.from_preset("W4A16", group_size=32))
    assert exc.value.field == "recipe.group_size" and "experts.0.down_proj" in exc.value.message


def test_a_model_that_is_not_a_causal_lm_is_refused_naming_the_model():
    from transformers import T5Config

    with pytest.raises(RecipeError) as exc:
        preflight(T5Config(num_layers=2, d_model=64), Recipe.from_preset("FP8_DYNAMIC"))
    assert exc.value.field == "model" and "causal LM" in exc.value.message


def test_experts_the_engine_cannot_split_are_refused_naming_what_is_missing():
    from compression.errors import UnsupportedModelError
    from compression.model_io.moe import check_fused_experts

    class NoGate(torch.nn.Module):  # experts without a gated MLP: up and down only
        def __init__(self):
            super().__init__()
            self.up_proj = torch.nn.Parameter(torch.zeros(4, 32, 64))
            self.down_proj = torch.nn.Parameter(torch.zeros(4, 64, 32))
            self.act_fn = torch.nn.functional.silu

    class Misshapen(NoGate):  # gate_up_proj that is neither [E, 2I, H] nor [E, H, 2I] against down_proj
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 48, 64))

    with pytest.raises(UnsupportedModelError, match="3-D gate_up_proj"):
        check_fused_experts("model.layers.0.mlp.experts", NoGate())
    with pytest.raises(UnsupportedModelError, match=r"gate_up_proj \(4, 48, 64\)"):
        check_fused_experts("model.layers.0.mlp.experts", Misshapen())


def test_compress_model_refuses_targets_that_match_nothing_before_touching_a_weight():
    from compression.sequential import compress_model

    model = tiny_family_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe.from_dict({"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
        "targets": ["re:.*mlp\\.experts\\.gate_up_proj$"], "ignore": ["lm_head"], "scheme": "FP8_DYNAMIC"}}}})
    with pytest.raises(RecipeError) as exc:
        compress_model(model, recipe, None)
    assert exc.value.field == "stages[0].modifiers[0].targets"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k in after)
