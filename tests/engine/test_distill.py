"""Distillation fine-tune stage: mask held, loss falls, checkpoints resume, budgets and bad input refused."""
import json

import pytest
import torch

from compression.algorithms.distill import (CHECKPOINT_META, FinetuneSettings, MaskedAdamW, check_memory, finetune,
                                 load_training_windows, parse_settings)
from compression.errors import CalibrationError, JobCancelled, RecipeError
from kernels.packing import is_24_sparse as check_24_pattern
from compression.recipe import Recipe, finetune_split
from compression.algorithms.sparsegpt import magnitude_mask_24
from tests.tiny import demo_tokenizer, tiny_llama, tiny_llama_config

DATA = "calibration/self_instruct_seed_tasks.jsonl"
VOCAB = 1024


def _pruned_pair(seed: int = 0):
    """(student pruned to 2:4 by magnitude, dense teacher, masks by module name)."""
    teacher = tiny_llama(seed=seed, layers=2, vocab=VOCAB, hidden=64, intermediate=128)
    student = tiny_llama(seed=seed, layers=2, vocab=VOCAB, hidden=64, intermediate=128)
    masks = {}
    for name, module in student.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            mask = magnitude_mask_24(module.weight.data)
            module.weight.data.masked_fill_(mask, 0.0)
            masks[name] = mask
    return student, teacher, masks


def _windows(n: int = 16, seq: int = 32, seed: int = 3) -> torch.Tensor:
    """``n`` windows: two random token windows repeated, so a few steps measurably fit them."""
    two = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))
    return two.repeat((n + 1) // 2, 1)[:n]


def _held(student, masks) -> None:
    modules = dict(student.named_modules())
    for name, mask in masks.items():
        w = modules[name].weight.data
        assert torch.equal(w[mask], torch.zeros_like(w[mask])) and not torch.signbit(w[mask]).any(), name
        assert check_24_pattern(w), name


def test_the_student_learns_from_the_teacher_with_the_mask_held():
    student, teacher, masks = _pruned_pair()
    embed = student.model.embed_tokens.weight.detach().clone()
    events = []
    settings = FinetuneSettings(steps=8, lr=1e-3, batch_size=2, seq_len=32)
    result = finetune(student, teacher, _windows(), masks, settings, progress=events.append)
    assert result.steps == 8 and result.tokens == 8 * 2 * 32
    assert result.losses[-1]["kl"] < 0.5 * result.losses[0]["kl"]
    _held(student, masks)
    assert torch.equal(student.model.embed_tokens.weight, embed)  # embedding/LM head frozen
    steps = [e for e in events if e.get("kind") == "finetune" and "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, 9))
    assert all(e["stage"] == "finetune" and e["tokens_per_s"] > 0 and e["steps"] == 8 for e in steps)
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "adamw_offload"])
def test_memory_saving_optimisers_train_and_hold_the_mask(optimizer):
    student, teacher, masks = _pruned_pair()
    settings = FinetuneSettings(steps=6, lr=1e-3, batch_size=2, seq_len=32, optimizer=optimizer,
                                gradient_checkpointing=True, layer_loss_weight=1.0)
    result = finetune(student, teacher, _windows(), masks, settings)
    assert result.losses[-1]["loss"] < result.losses[0]["loss"]
    assert result.losses[0]["layer_loss"] > 0
    _held(student, masks)


def test_8bit_state_is_a_quarter_of_fp32_and_tracks_it():
    torch.manual_seed(0)
    p32, p8 = torch.nn.Parameter(torch.randn(64, 256)), torch.nn.Parameter(torch.randn(64, 256))
    p8.data.copy_(p32.data)
    start = p32.detach().clone()
    a, b = MaskedAdamW([p32], lr=1e-2), MaskedAdamW([p8], lr=1e-2, mode="adamw_8bit")
    for _ in range(5):
        g = torch.randn(64, 256)
        p32.grad, p8.grad = g.clone(), g.clone()
        a.step(), b.step()
    moved32, moved8 = p32.detach() - start, p8.detach() - start
    assert (moved8 - moved32).norm() < 0.05 * moved32.norm()
    bytes32 = sum(t.numel() * t.element_size() for t in a.state_tensors().values())
    bytes8 = sum(t.numel() * t.element_size() for t in b.state_tensors().values())
    assert bytes8 < 0.3 * bytes32


def test_a_cancelled_fine_tune_resumes_from_its_checkpoint(tmp_path):
    settings = FinetuneSettings(steps=6, lr=1e-3, batch_size=2, seq_len=32, checkpoint_every=2)
    windows = _windows()
    straight, teacher, masks = _pruned_pair()
    finetune(straight, teacher, windows, masks, settings)

    student, teacher, masks = _pruned_pair()
    calls = []
    with pytest.raises(JobCancelled):
        finetune(student, teacher, windows, masks, settings, checkpoint_dir=tmp_path, fingerprint="job-a",
                 should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert json.loads((tmp_path / CHECKPOINT_META).read_text())["step"] == 3  # saved at the cancel

    other, teacher, masks = _pruned_pair()
    once = FinetuneSettings(steps=1, lr=1e-3, batch_size=2, seq_len=32, checkpoint_every=1000)
    assert finetune(other, teacher, windows, masks, once, checkpoint_dir=tmp_path,
                    fingerprint="job-b").resumed_from == 0  # someone else's checkpoint is not used

    resumed, teacher, masks = _pruned_pair()  # a fresh process: the pruned model again, then the checkpoint
    result = finetune(resumed, teacher, windows, masks, settings, checkpoint_dir=tmp_path, fingerprint="job-a")
    assert result.resumed_from == 3 and result.steps == 3 and len(result.losses) == 6
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    _held(resumed, masks)


def test_training_windows_are_packed_and_a_small_dataset_is_refused():
    from django.conf import settings as django_settings

    tok = demo_tokenizer()
    windows = load_training_windows(DATA, tok, windows=4, seq_len=64, data_dir=django_settings.COMPRESSOR_DATA_DIR)
    assert windows.shape == (4, 64) and windows.dtype == torch.long
    with pytest.raises(CalibrationError) as info:
        load_training_windows(DATA, tok, windows=100_000, seq_len=512, data_dir=django_settings.COMPRESSOR_DATA_DIR,
                              field="recipe.stages[1].modifiers[0].dataset")
    assert info.value.field == "recipe.stages[1].modifiers[0].dataset" and "holds" in info.value.message


def test_too_few_windows_for_the_budget_fail_before_training():
    student, teacher, masks = _pruned_pair()
    with pytest.raises(CalibrationError):
        finetune(student, teacher, _windows(n=3), masks, FinetuneSettings(steps=4, batch_size=2, seq_len=32))


FT = "DistillationFinetuneModifier"
SPARSE = {"sparsity_stage": {"sparsity_modifiers": {"SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4"}}}}
QUANT = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"scheme": "FP8_DYNAMIC"}}}}


def _ft(**args):
    return {"finetune_stage": {"finetune_modifiers": {FT: {"dataset": DATA, "tokens": 4096, **args}}}}


def test_prune_finetune_quantize_recipe_round_trips_and_splits():
    recipe = Recipe.from_dict({**SPARSE, **_ft(lr=1e-5), **QUANT})
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe and Recipe.from_dict(recipe.to_dict()) == recipe
    before, modifier, after = finetune_split(recipe)
    assert [m.kind for m in before.modifiers] == ["SparseGPTModifier"]
    assert modifier.finetune.tokens == 4096 and modifier.finetune.total_steps == 2
    assert [m.kind for m in after.modifiers] == ["QuantizationModifier"]
    assert "distillation fine-tune" in recipe.describe()


@pytest.mark.parametrize("stages, field, words", [
    ({**_ft(), **QUANT}, "stages[0].modifiers[0]", "preceding sparsity stage"),
    ({**_ft(), **SPARSE, **QUANT}, "stages[0].modifiers[0]", "preceding sparsity stage"),  # pruned after it
    ({**SPARSE, **QUANT, **_ft()}, "stages[2].modifiers[0]", "before quantization"),
    ({**SPARSE, "ft": {"finetune_modifiers": {FT: {"dataset": DATA, "tokens": 10},
                                               "QuantizationModifier": {"scheme": "FP8_DYNAMIC"}}}},
     "stages[1].modifiers[0]", "only modifier"),
    ({**SPARSE, **_ft(steps=3)}, "stages[1].modifiers[0].tokens", "exactly one"),
    ({**SPARSE, **_ft(optimizer="sgd")}, "stages[1].modifiers[0].optimizer", "adamw_8bit"),
    ({**SPARSE, **_ft(lr=3)}, "stages[1].modifiers[0].lr", "between"),
    ({**SPARSE, **_ft(batch_size=0)}, "stages[1].modifiers[0].batch_size", "integer"),
    ({**SPARSE, **_ft(epochs=2)}, "stages[1].modifiers[0].epochs", "unknown field"),
])
def test_bad_fine_tune_recipes_name_the_field(stages, field, words):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(stages)
    assert info.value.field == field and words in info.value.message


def test_a_budget_that_does_not_fit_memory_names_what_to_change():
    config = tiny_llama_config(hidden=2048, intermediate=8192, layers=24, heads=16, kv_heads=8, vocab=128_000)
    big = parse_settings({"dataset": DATA, "steps": 10, "batch_size": 16, "seq_len": 4096}, "ft")
    with pytest.raises(RecipeError) as info:
        check_memory(config, big, 24 * 2 ** 30, "ft")
    assert info.value.field == "ft.gradient_checkpointing" and "GiB" in info.value.message
    small = parse_settings({"dataset": DATA, "steps": 10, "batch_size": 1, "seq_len": 512,
                            "gradient_checkpointing": True, "optimizer": "adamw_8bit"}, "ft")
    need = check_memory(config, small, 80 * 2 ** 30, "ft")
    assert need["total"] < check_memory(config, parse_settings(
        {"dataset": DATA, "steps": 10, "batch_size": 1, "seq_len": 512}, "ft"), 10 ** 15, "ft")["total"]


def test_a_hub_chat_dataset_is_packed_through_the_chat_template(monkeypatch):
    """The Hub is mocked (a local datasets.Dataset); the real loading path and packing run."""
    import datasets

    from compression import data_sources

    chats = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}. " * 20}]} for i in range(40)]
    asked = []

    def fake_hub(source, split):
        asked.append((source, split))
        return datasets.Dataset.from_list(chats)

    monkeypatch.setattr(data_sources, "hub_load_dataset", fake_hub)
    windows = load_training_windows("org/chat:train_sft", demo_tokenizer(), windows=6, seq_len=128, data_dir="/nonexistent")
    assert asked == [("org/chat", "train_sft")] and windows.shape == (6, 128)
    text = demo_tokenizer().decode(windows[0])
    assert "<|im_start|>" in text  # SmolLM2's chat template was applied


def test_a_crashed_fine_tune_resumes_from_its_last_periodic_checkpoint(tmp_path):
    """A crash (not a cancel) saves nothing at that moment; the periodic checkpoint is what resumes."""
    settings = FinetuneSettings(steps=6, lr=1e-3, batch_size=2, seq_len=32, checkpoint_every=2)
    windows = _windows()
    straight, teacher, masks = _pruned_pair()
    finetune(straight, teacher, windows, masks, settings)

    def crash_at_step_3(event):
        if event.get("step") == 3 and "loss" in event:
            raise RuntimeError("worker died")

    student, teacher, masks = _pruned_pair()
    with pytest.raises(RuntimeError):
        finetune(student, teacher, windows, masks, settings, checkpoint_dir=tmp_path, fingerprint="job",
                 progress=crash_at_step_3)
    meta = json.loads((tmp_path / CHECKPOINT_META).read_text())
    assert meta["step"] == 2 and [r["step"] for r in meta["losses"]] == [1, 2]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # written atomically

    resumed, teacher, masks = _pruned_pair()
    result = finetune(resumed, teacher, windows, masks, settings, checkpoint_dir=tmp_path, fingerprint="job")
    assert result.resumed_from == 2 and result.steps == 4 and [r["step"] for r in result.losses] == list(range(1, 7))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    _held(resumed, masks)


README_RECIPE = """
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier: {sparsity: 0.5, mask_structure: "2:4", reconstruction: true}
finetune_stage:
  finetune_modifiers:
    DistillationFinetuneModifier: {dataset: "HuggingFaceH4/ultrachat_200k:train_sft", tokens: 1000000,
                                   lr: 1.0e-5, batch_size: 8, seq_len: 512, gradient_checkpointing: true}
quant_stage:
  quant_modifiers:
    QuantizationModifier: {scheme: FP8_DYNAMIC, targets: [Linear], ignore: [lm_head]}
"""


def test_a_full_recovery_recipe_round_trips_in_the_llm_compressor_yaml_style():
    """Every reconstruction and fine-tune argument survives YAML and the stored dict (what the job row
    keeps and the worker parses), each stage keeping its own modifier and arguments."""
    import yaml

    from compression.algorithms.reconstruction import ReconstructionSettings

    recipe = Recipe.from_yaml(f"""
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      reconstruction: {{steps: 16, lr: 1e-4, batch_size: 3, target: layer}}
finetune_stage:
  finetune_modifiers:
    {FT}:
      dataset: "upload:7"
      steps: 40
      lr: 2e-5
      batch_size: 2
      seq_len: 256
      grad_accum: 4
      temperature: 2.0
      kl_weight: 0.5
      layer_loss_weight: 0.25
      gradient_checkpointing: true
      optimizer: adamw_8bit
      warmup_steps: 5
      checkpoint_every: 10
      seed: 9
quant_stage:
  quant_modifiers:
    GPTQModifier: {{scheme: W4A16, targets: [Linear], ignore: [lm_head]}}
""")
    for again in (Recipe.from_yaml(recipe.to_yaml()), Recipe.from_dict(recipe.to_dict()),
                  Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))):
        assert again == recipe
        assert again.modifiers[0].reconstruction == ReconstructionSettings(steps=16, lr=1e-4, batch_size=3,
                                                                           target="layer")
        assert again.modifiers[1].finetune == FinetuneSettings(
            dataset="upload:7", steps=40, lr=2e-5, batch_size=2, seq_len=256, grad_accum=4, temperature=2.0,
            kl_weight=0.5, layer_loss_weight=0.25, gradient_checkpointing=True, optimizer="adamw_8bit",
            warmup_steps=5, checkpoint_every=10, seed=9)
    written = yaml.safe_load(recipe.to_yaml())
    assert list(written) == ["sparsity_stage", "finetune_stage", "quant_stage"]
    assert list(written["finetune_stage"]) == ["finetune_modifiers"]
    assert list(written["finetune_stage"]["finetune_modifiers"]) == [FT]
    assert written["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]["reconstruction"]["steps"] == 16
    readme = Recipe.from_yaml(README_RECIPE)  # the README's example
    assert Recipe.from_yaml(readme.to_yaml()) == readme
    assert [m.kind for m in readme.modifiers] == ["SparseGPTModifier", FT, "QuantizationModifier"]
    assert readme.modifiers[1].finetune.total_steps == 245  # ⌈1,000,000 / (8 × 512)⌉


def test_submission_counts_tokens_as_the_worker_packs_them_and_its_bounds_hold():
    from django.conf import settings as django_settings

    from compression.algorithms.distill import count_training_tokens, record_token_ids, record_tokens_bound
    from compression.calibration import _local_records

    tok = demo_tokenizer()
    from pathlib import Path

    records = _local_records(Path(django_settings.COMPRESSOR_DATA_DIR) / DATA)[:40] + [
        "a", "", {"text": "  "}, {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "ß∂ƒ 漢字 🙂"}, {"role": "assistant", "content": "ok"}]}]
    exact = [len(record_token_ids(r, tok)) for r in records]
    for record, n in zip(records, exact):  # with the tokenizer (its template) and without (an allowance)
        assert record_tokens_bound(record, tok) >= n and record_tokens_bound(record) >= n, record
    assert exact[-2] > len("hi") + 4  # the chat template's system prompt is counted, not just the content
    total = sum(exact)
    assert count_training_tokens(records, tok, 10**9) == (total, True)
    early, _ = count_training_tokens(records, tok, 100)
    assert 100 <= early < total  # stops once the budget is covered
    capped, is_exact = count_training_tokens(records, tok, 10**9, exact_tokens=500)
    assert not is_exact and capped >= total  # past the cap: an upper bound, never an undercount


def test_the_demo_tokenizer_is_read_from_the_gguf_once_and_cached_as_files(tmp_path, monkeypatch):
    from compression.model_io import loading

    monkeypatch.setenv(loading.CONFIG_CACHE_ENV, str(tmp_path))
    reference = demo_tokenizer()  # the test helper's own GGUF parse, before from_pretrained is watched below
    loading._demo_tokenizer.cache_clear()
    try:
        first = loading.load_tokenizer("demo")
        (cached,) = tmp_path.glob("demo-tokenizer-*")
        assert (cached / "tokenizer.json").is_file()
        loading._demo_tokenizer.cache_clear()
        from transformers import AutoTokenizer

        real = AutoTokenizer.from_pretrained.__func__

        def no_gguf(cls, *args, **kwargs):  # a second process reads the cached files, never the GGUF
            assert "gguf_file" not in kwargs, "parsed the GGUF again"
            return real(cls, *args, **kwargs)

        monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(no_gguf))
        second = loading._demo_tokenizer()
    finally:
        loading._demo_tokenizer.cache_clear()
    text = "Fine-tune the pruned model."
    assert second(text)["input_ids"] == first(text)["input_ids"] == reference(text)["input_ids"]
    assert second.chat_template == first.chat_template
