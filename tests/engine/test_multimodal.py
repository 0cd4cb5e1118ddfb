"""Vision-language checkpoints (Gemma 3 4B+, Llama 4, Mistral 3): the engine compresses the language model's
decoder layers and keeps the vision tower and projector as they were.

Tiny random models built from transformers' own config classes, saved as a user's local directory in
the legacy checkpoint layout transformers writes for them (``language_model.model.layers...`` on disk,
``model.language_model.layers...`` as modules), loaded by the product's loader (Mistral 3 has no
AutoModelForCausalLM mapping), compressed, exported, and read back by transformers and by our runtime.
"""
from __future__ import annotations

import json

import pytest
import torch

from compression.errors import RecipeError
from compression.model_io.export import export_checkpoint
from compression.model_io.loading import load_model
from compression.model_io.runtime import load_compressed_model
from compression.preflight import preflight
from compression.recipe import Recipe
from compression.sequential import compress_model
from tests.engine.conftest import random_calibration, read_safetensors, same_module_records
from tests.tiny import demo_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=49152, head_dim=16, max_position_embeddings=128)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
               patch_size=8)
CONFIGS = {
    "gemma3": lambda: dict(text_config=dict(_TEXT, sliding_window=4), vision_config=_VISION, mm_tokens_per_image=4),
    "mistral3": lambda: dict(text_config=_TEXT, vision_config=dict(_VISION, head_dim=16)),
    "llama4": lambda: dict(text_config=dict(_TEXT, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128),
                           vision_config=dict(_VISION, vision_output_dim=64, projector_input_dim=64,
                                              projector_output_dim=64)),
}
IDS = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(5))


def _save(family: str, path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(family, **CONFIGS[family]()))
    model.save_pretrained(path)
    demo_tokenizer().save_pretrained(path)
    return path


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_preset_compresses_the_language_model_and_keeps_the_vision_tower(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    source = _save(family, tmp_path / "src")
    loaded = load_model(str(source), allowed_roots=[tmp_path])
    model = loaded.model
    assert "ForConditionalGeneration" in type(model).__name__  # the whole model, not its text part alone
    recipe = Recipe.from_preset("W4A16", group_size=32)
    preflight(model.config, recipe)  # the presets leave the vision tower out instead of refusing it
    report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=1000))
    ours = _logits(model)
    out = tmp_path / "export"
    export_checkpoint(model, loaded.tokenizer, recipe, report, out)

    assert report.modules and [n for n in report.modules if ".layers." not in n or "vision" in n] == []
    assert not any(n.endswith("lm_head") for n in report.modules)  # preset ignore 'lm_head' = the head's module
    before, after = read_safetensors(source), read_safetensors(out)
    vision = [k for k in before if "vision" in k or "projector" in k]
    assert vision and all(torch.equal(before[k].to(after[k].dtype), after[k]) for k in vision)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert "lm_head" in ignore and any("vision" in i for i in ignore)  # as transformers names the modules

    theirs = _logits(AutoModelForImageTextToText.from_pretrained(out))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(load_compressed_model(out)), ours, rtol=2e-2, atol=2e-2)


def test_a_recipe_that_targets_the_vision_tower_is_refused_naming_the_container_to_ignore(tmp_path):
    model = load_model(str(_save("gemma3", tmp_path / "src")), allowed_roots=[tmp_path]).model
    recipe = Recipe.from_yaml("""
quant_stage:
  quant_modifiers:
    GPTQModifier: {targets: [Linear], ignore: [lm_head], scheme: W4A16}
""")
    with pytest.raises(RecipeError) as exc:
        preflight(model.config, recipe)
    assert exc.value.field == "stages[0].modifiers[0].ignore"
    assert "re:vision_tower.*" in exc.value.message or "re:model.vision_tower.*" in exc.value.message


def test_patterns_written_against_module_paths_match_as_in_llm_compressor(tmp_path):
    model = load_model(str(_save("gemma3", tmp_path / "src")), allowed_roots=[tmp_path]).model
    # llm-compressor matches the loaded model's module paths: model.language_model.layers.N...
    recipe = Recipe.from_yaml("""
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      targets: ["re:model\\\\.language_model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\..*"]
      ignore: ["re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
      scheme: FP8_DYNAMIC
""")
    preflight(model.config, recipe)
    report = compress_model(model, recipe, None)
    assert len(report.modules) == 2 * 4 and all(".self_attn." in n for n in report.modules)


@pytest.mark.parametrize("family", ["gemma3", "llama4"])
def test_a_streamed_job_reads_the_renamed_checkpoint_and_writes_what_the_in_memory_job_writes(family, tmp_path):
    """Llama 4 adds experts stored fused under a renamed prefix: cut per expert after the rename."""
    from compression.pipeline import run_job

    source = _save(family, tmp_path / "models" / family)

    def spec(streaming: str) -> dict:
        return {"job_id": "s", "model": str(source), "recipe": Recipe.from_preset("W4A16", group_size=32).to_dict(),
                "allowed_roots": [str(source.parent)], "evaluation": {"tasks": [], "speed": False},
                "streaming": streaming, "calibration": {"source": "builtin:chat-v1", "samples": 4, "seqlen": 32},
                "device": "cpu"}

    torch.manual_seed(0)
    dense = run_job(spec("never"), tmp_path / "dense")
    torch.manual_seed(0)
    streamed = run_job(spec("always"), tmp_path / "streamed")
    assert dense["memory"]["mode"] == "in-memory" and streamed["memory"]["mode"] == "streaming"
    a, b = read_safetensors(tmp_path / "dense"), read_safetensors(tmp_path / "streamed")
    assert a.keys() == b.keys() and any(k.startswith("language_model.model.layers.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert same_module_records(streamed["compression"]["modules"], dense["compression"]["modules"])
    if family == "llama4":
        assert any(".feed_forward.experts.3.down_proj.weight_packed" in k for k in a)
