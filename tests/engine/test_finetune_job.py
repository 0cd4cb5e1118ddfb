"""A whole job with a fine-tune stage: 2:4 → distillation fine-tune → FP8_DYNAMIC, resume after cancel."""
import pytest
import torch
from safetensors import safe_open

from compression.errors import CalibrationError, JobCancelled
from compression.recipe import Recipe
from tests.tiny import save_tiny_llama

DATA = "calibration/self_instruct_seed_tasks.jsonl"


def _spec(tmp_path, reconstruction=None, **finetune):
    from django.conf import settings

    models = tmp_path / "models"
    model_dir = models / "tiny"
    if not model_dir.exists():
        save_tiny_llama(model_dir)
    recipe = Recipe.from_dict({
        "sparsity_stage": {"sparsity_modifiers": {"SparseGPTModifier": {
            "sparsity": 0.5, "mask_structure": "2:4", **({"reconstruction": reconstruction} if reconstruction else {})}}},
        "finetune_stage": {"finetune_modifiers": {"DistillationFinetuneModifier": {
            "dataset": DATA, "steps": 3, "batch_size": 1, "seq_len": 32, "lr": 1e-4, "checkpoint_every": 1,
            **finetune}}},
        "quant_stage": {"quant_modifiers": {"QuantizationModifier": {"scheme": "FP8_DYNAMIC"}}}})
    return {"job_id": "ft", "model": str(model_dir), "recipe": recipe.to_dict(), "allowed_roots": [str(models)],
            "calibration": {"source": DATA, "samples": 2, "seqlen": 16},
            "evaluation": {"tasks": ["wikitext2_ppl"], "windows": 1, "seqlen": 32, "speed": False},
            "data_dir": settings.COMPRESSOR_DATA_DIR, "device": "cpu", "cache_dir": str(tmp_path / "cache"),
            "owner_id": 1}


def _checkpoints(tmp_path):
    return list((tmp_path / "cache" / "finetune").glob("*/finetune_state.json"))


def test_prune_finetune_quantize_job_exports_a_sparse_fp8_model_and_cards_the_steps(tmp_path):
    from compression.pipeline import run_job

    events = []
    results = run_job(_spec(tmp_path, reconstruction={"steps": 2, "batch_size": 1}), tmp_path / "out",
                      progress=events.append)
    ft = results["finetune"]
    assert ft["steps"] == 3 and len(ft["loss_curve"]) == 3 and ft["tokens"] == 3 * 32
    steps = [e for e in events if e.get("kind") == "finetune" and "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3] and all(e["stage"] == "finetune" for e in steps)
    fractions = [e["fraction"] for e in events if "fraction" in e]
    assert fractions == sorted(fractions)  # prune → fine-tune → quantize never moves the bar back
    assert results["compression"]["sparsity"]["sparsity_structure"] == "2:4"
    with safe_open(str(next((tmp_path / "out").glob("*.safetensors"))), "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.down_proj.weight").float()
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
    groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
    assert groups.max() <= 2  # the 2:4 zeros held through fine-tuning and FP8 quantization
    card = (tmp_path / "out" / "README.md").read_text()
    creation = card.split("## Creation", 1)[1]
    for words in ("Pruning: SparseGPT 2:4", "Recovery: layer-wise reconstruction", "2 Adam steps",
                  "Recovery: distillation fine-tuning", f"on {DATA}: 3 steps of 1 × 32 tokens", "= 96 tokens",
                  "Quantization: FP8"):
        assert words in creation, words
    assert creation.index("Pruning") < creation.index("layer-wise reconstruction") \
        < creation.index("distillation fine-tuning") < creation.index("Quantization")
    assert "samples of up to 16 tokens" in creation.split("Recovery")[0]  # the pruning step's calibration data
    recon = results["compression"]["reconstruction"]
    assert len(recon) == 2 and all(r["error_before"] >= 0 and "error_after" in r for r in recon)  # chart's data
    assert _checkpoints(tmp_path) == []  # removed once the job succeeded


def test_a_cancelled_fine_tune_leaves_no_artifact_and_the_resubmitted_job_resumes(tmp_path):
    from compression.pipeline import run_job

    spec = _spec(tmp_path)
    seen = []

    def stop():
        return any(e.get("kind") == "finetune" and e.get("step") == 2 for e in seen)

    with pytest.raises(JobCancelled):
        run_job(spec, tmp_path / "out", progress=seen.append, should_stop=stop)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    assert len(_checkpoints(tmp_path)) == 1
    results = run_job(spec, tmp_path / "out")
    assert results["finetune"]["resumed_from_step"] == 2 and results["finetune"]["steps"] == 1


def test_a_dataset_too_small_for_the_budget_fails_before_pruning(tmp_path):
    from compression.pipeline import run_job

    events = []
    with pytest.raises(CalibrationError) as info:
        run_job(_spec(tmp_path, steps=100_000, batch_size=8, seq_len=512), tmp_path / "out",
                progress=events.append)
    assert info.value.field == "recipe.stages[1].modifiers[0].dataset"
    assert not any(e["stage"] == "compress" for e in events)
    assert not (tmp_path / "out").exists()
