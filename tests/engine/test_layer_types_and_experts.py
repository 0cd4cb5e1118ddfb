"""Per-layer attention types and MoE expert statistics in the layer-by-layer walk."""
import pytest
import torch

from compression.model_io.moe import PerExpertLinears, unfuse_experts
from compression.recipe import Recipe
from compression.sequential import compress_model
from compression.model_io.walk import capture_layer_inputs, decoder_layers
from tests.engine.conftest import random_calibration
from tests.tiny import tiny_family_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "llama", "mixtral", "deepseek_v3"])
def test_replaying_the_layers_one_at_a_time_gives_the_models_own_hidden_states(family):
    # Gemma 2/3 (sliding window 4 < 16 tokens): layer 0 is sliding, layer 1 full attention, and
    # Gemma 3 rotates them with different RoPE bases; layer 0's arguments would be wrong for layer 1.
    extra = {"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2} \
        if family.startswith("gemma") else {}
    model = tiny_family_model(family, **extra)
    calibration = random_calibration(n=2, length=16, vocab=256)
    _, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, calibration, "cpu")
    with torch.no_grad():
        for index, layer in enumerate(layers):
            inputs = inputs.advanced(inputs.forward(layer, index))
        for sample, replayed in zip(calibration, inputs.hidden):
            out = model(sample["input_ids"], output_hidden_states=True)
            # hidden_states[-1] has the final norm applied; compare with the norm of ours
            torch.testing.assert_close(model.model.norm(replayed), out.hidden_states[-1], rtol=1e-5, atol=1e-5)


def test_gemma_layers_of_different_types_receive_different_masks_and_rope():
    model = tiny_family_model("gemma3_text")
    _, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, random_calibration(n=1, length=16, vocab=256), "cpu")
    (_, sliding), (_, full) = inputs.pairs(0)[0], inputs.pairs(1)[0]
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])  # local vs global RoPE
    masks = [kw["attention_mask"] for kw in (sliding, full)]
    if all(isinstance(m, torch.Tensor) for m in masks):
        assert not torch.equal(masks[0], masks[1])


def test_each_expert_sees_exactly_the_tokens_routed_to_it_and_the_layer_output_is_unchanged():
    model = tiny_family_model("qwen3_moe")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = model(ids).logits
    with torch.no_grad():
        routed = torch.nn.functional.one_hot(model.model.layers[1].mlp.gate(
            _layer_input(model, ids))[2], 4).sum(dim=(0, 1))
    unfuse_experts(model)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, PerExpertLinears) and experts.num_experts == 4
    seen = [0] * 4
    for e in range(4):
        experts.expert(e).gate_proj.register_forward_hook(
            lambda mod, args, out, e=e: seen.__setitem__(e, seen[e] + args[0].reshape(-1, 64).shape[0]))
    with torch.no_grad():
        split = model(ids).logits
    torch.testing.assert_close(split, fused, rtol=1e-5, atol=1e-5)
    assert seen == routed.tolist() and sum(seen) == 24 * 2  # top-2 routing
    seen[:] = [0] * 4
    experts.calibrate_all_experts = True
    with torch.no_grad():
        everyone = model(ids).logits
    assert seen == [24] * 4  # every token reaches every expert's statistics ...
    torch.testing.assert_close(everyone, fused, rtol=1e-5, atol=1e-5)  # ... but only routed ones count


def _layer_input(model, ids):
    """The MoE block's input in layer 1 (post-attention-norm hidden states), flattened."""
    captured = {}
    handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    model(ids)
    handle.remove()
    return captured["x"].reshape(-1, 64)


def test_under_used_experts_fall_back_and_the_report_says_so():
    model = tiny_family_model("mixtral")
    report = compress_model(model, Recipe.from_preset("W4A16", group_size=32),
                            random_calibration(n=2, length=8, vocab=256), min_expert_tokens=1000)
    fallbacks = report.summary()["fallbacks"]
    assert len(fallbacks) == 2 * 4 * 3  # every expert projection of both layers
    assert all("round-to-nearest" in f["reason"] and "calibration tokens" in f["reason"] for f in fallbacks)
    assert {f["module"] for f in fallbacks} >= {"model.layers.0.block_sparse_moe.experts.3.w2"}
    assert report.modules["model.layers.0.block_sparse_moe.experts.3.w2"].losses.get("rtn") is not None
    assert report.routers == ["model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"]


def test_calibrate_all_experts_leaves_no_expert_without_statistics():
    model = tiny_family_model("mixtral")
    report = compress_model(model, Recipe.from_preset("W4A16", group_size=32),
                            random_calibration(n=2, length=8, vocab=256), calibrate_all_experts=True)
    assert report.fallbacks == [] and report.summary()["calibrate_all_experts"] is True
    assert report.modules["model.layers.1.block_sparse_moe.experts.0.w1"].losses.get("gptq") is not None
    assert report.experts == 2 * 4
