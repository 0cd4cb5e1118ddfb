"""The recipe's fine-tune stage (DistillationFinetuneModifier) around compress_model.

Before pruning the training data is tokenized (a dataset too small fails there, before any work)
and the dense teacher copied; after pruning the student is fine-tuned with the mask held
(compression.algorithms.distill), then the recipe stages after it (quantization) run with the
same masks. Without a fine-tune stage it does nothing.
"""
from __future__ import annotations

import re

from pathlib import Path

from compression.progress import Stage, engine_progress, timed

class FinetuneStage:
    """A recipe's DistillationFinetuneModifier stage around compress_model: before pruning the
    training data is tokenized (a dataset too small fails here, before any work) and the dense
    teacher copied; after pruning the student is fine-tuned with the mask held, then the stages
    after it (quantization) run with the same masks. Without a fine-tune stage it does nothing."""

    def __init__(self, spec, recipe, model, tokenizer, data_dir, calibration_spec, progress, should_stop):
        from compression.recipe import finetune_split

        self.spec, self.recipe, self.progress, self.should_stop = spec, recipe, progress, should_stop
        before, self.modifier, self.after = finetune_split(recipe)
        self.before = before if self.modifier is not None else recipe
        self.result = None
        self.checkpoint_dir = None
        self.windows = self.teacher = None
        self.prune_span = (0.0, 1.0)
        if self.modifier is None:
            return
        self.prune_span = (0.0, 0.3)
        settings = self.modifier.finetune
        index = next(i for i, st in enumerate(recipe.stages) if st.modifiers[0] is self.modifier)
        self.path = f"recipe.stages[{index}].modifiers[0]"
        data = spec.get("finetune_data") or {}
        stage = Stage(progress, "calibration")
        stage(f"tokenizing {settings.windows_needed} fine-tuning windows of {settings.seq_len} tokens", 1.0)
        from compression.algorithms.distill import load_training_windows

        self.windows = load_training_windows(
            data.get("source") or settings.dataset, tokenizer, windows=settings.windows_needed,
            seq_len=settings.seq_len, data_dir=data.get("data_dir") or data_dir, seed=settings.seed,
            field=f"{self.path}.dataset")
        self.dataset_label = data.get("label") or settings.dataset
        self.teacher = _copy_model(model)
        self.fingerprint = _fingerprint(spec, calibration_spec)
        if spec.get("cache_dir"):
            self.checkpoint_dir = Path(spec["cache_dir"]) / "finetune" / self.fingerprint[:32]

    def run(self, model, report, calibration, device, timings):
        from compression.algorithms.distill import finetune
        from compression.sequential import compress_model, merge_reports, sparsity_masks

        settings = self.modifier.finetune
        masks = sparsity_masks(model, report)
        module_masks = sparsity_masks(model, report, by_module=True)
        stage = Stage(self.progress, "finetune")
        stage(f"fine-tuning against the dense teacher: {settings.describe()}")

        def forward(event: dict) -> None:
            extra = {k: v for k, v in event.items() if k not in ("stage", "message", "fraction")}
            stage(event.get("message", ""), (event.get("step") or 0) / max(settings.total_steps, 1), **extra)

        with timed(timings, "finetune_s"):
            self.result = finetune(model, self.teacher, self.windows, module_masks, settings, progress=forward,
                                   should_stop=self.should_stop, checkpoint_dir=self.checkpoint_dir,
                                   fingerprint=self.fingerprint)
        self.teacher = self.windows = None
        stage("fine-tune done", 1.0)
        if self.after is None:
            return report
        with timed(timings, "quantize_s"):
            second = compress_model(model, self.after, calibration, device=device,
                                    progress=engine_progress(self.progress, 0.9, 1.0),
                                    should_stop=self.should_stop, held_masks=masks)
        return merge_reports(report, second)

    def summary(self) -> dict | None:
        if self.result is None:
            return None
        out = self.result.summary()
        losses = out.pop("losses")
        stride = max(1, len(losses) // 500)  # at most ~500 points of the curve in the results
        out["loss_curve"] = [[r["step"], r["loss"]] for r in losses[::stride]]
        out["settings"] = self.modifier.finetune.to_dict()
        out["dataset"] = self.dataset_label
        return out

    def creation_steps(self, calibration_spec: dict, report) -> list[str]:
        """One sentence per step of the recipe for the card's Creation section (data and budgets)."""
        return creation_steps(self.recipe, calibration_spec, report, finetuned=self.result,
                              dataset_label=getattr(self, "dataset_label", None))

    def cleanup(self) -> None:
        from compression.algorithms.distill import remove_checkpoints

        remove_checkpoints(self.checkpoint_dir)


def creation_steps(recipe, calibration_spec: dict, report=None, *, finetuned=None,
                   dataset_label: str | None = None) -> list[str]:
    """The model card's Creation steps, one sentence per step of ``recipe`` in order: pruning,
    recovery (layer-wise reconstruction, distillation fine-tune) and quantization, each with its data
    and budget. ``report``: the compression report (per-layer reconstruction results);
    ``finetuned``: the fine-tune's FinetuneResult (tokens and minutes it took)."""
    steps = []
    calib = f"{calibration_spec.get('label') or calibration_spec['source']}, {calibration_spec['samples']} " \
            f"samples of up to {calibration_spec['seqlen']} tokens"
    for m in recipe.modifiers:
        if m.prunes:
            how = "SparseGPT" if m.kind == "SparseGPTModifier" else "Wanda"
            steps.append(f"Pruning: {how} {m.mask_structure if m.mask_structure != '0:0' else 'unstructured'} "
                         f"({m.sparsity:.0%} of the targeted weights), calibrated on {calib}.")
            if m.reconstruction is not None:
                r = m.reconstruction
                layers = getattr(report, "reconstruction", {}) or {}
                gain = ""
                if layers:
                    kept = sum(1 for v in layers.values() if v.get("kept"))
                    gain = f" It lowered the output error in {kept} of {len(layers)} layers."
                steps.append(f"Recovery: layer-wise reconstruction of every pruned decoder layer, {r.steps} Adam "
                             f"steps (lr {r.lr:g}, {r.batch_size} calibration samples per step, target: "
                             f"{'dense model activations' if r.target == 'dense' else 'dense layer output'}) "
                             f"on the same calibration data, pruned weights held at zero.{gain}")
        elif m.finetune is not None:
            f = m.finetune
            pruned = [x for x in recipe.modifiers if x.prunes]
            held = pruned[-1].mask_structure if pruned and pruned[-1].mask_structure != "0:0" else "sparsity"
            done = f" ({finetuned.tokens:,} tokens in {finetuned.seconds / 60:.1f} min)" if finetuned else ""
            steps.append("Recovery: distillation fine-tuning against the dense model (KL on logits"
                         + (f" + {f.layer_loss_weight:g} × per-layer output MSE" if f.layer_loss_weight else "")
                         + f") on {dataset_label or f.dataset}: {f.total_steps} steps of "
                         f"{f.batch_size} × {f.seq_len} tokens × {f.grad_accum} accumulation = "
                         f"{f.total_steps * f.tokens_per_step:,} tokens{done}, lr {f.lr:g}, {held} mask held.")
        elif m.transforms:
            steps.append(_smoothing_step(m, report, calib))
        elif m.quantizes:
            from compression.recipe import Recipe, Stage

            one = Recipe([Stage("s", "quant_modifiers", [m])])
            what = one.describe()
            data = f", calibrated on {calib}" if one.needs_calibration else " (no calibration data)"
            gptq = "GPTQ " if m.kind == "GPTQModifier" and "GPTQ" not in what else ""
            steps.append(f"Quantization: {gptq}{what}{data}"
                         + (", pruned weights kept at zero." if any(x.prunes
                                                                 for x in recipe.modifiers) else "."))
    return steps


def _smoothing_step(m, report, calib: str) -> str:
    """The card's sentence for an AWQ / SmoothQuant modifier: how many mappings it folded, and which of its
    default mappings it left out (a post-norm block, a norm without weights, a fold that would change the
    layer) -- or that it applied to no module, so that a no-op is never silent."""
    what = ("AWQ (activation-aware scales, grid search)" if m.kind == "AWQModifier" else
            "logarithmic activation equalization" if getattr(m, "algorithm", None) == "log_equalization" else
            f"SmoothQuant (strength {m.smoothing_strength:g})")
    entries = [e for e in (getattr(report, "smoothing", None) or []) if e.get("modifier") == m.kind]
    applied = [e for e in entries if "skipped" not in e]
    skipped = [e for e in entries if "skipped" in e]
    layers = len({e["layer"] for e in applied})
    left = ""
    if skipped:
        kinds = sorted({e["smooth_layer"].rsplit(".", 1)[-1] for e in skipped})
        left = (f" {len(skipped)} default mapping(s) from {', '.join(kinds)} were left out: "
                f"{skipped[0]['skipped'].split(': ')[-1]}.")
    if report is not None and not applied:
        return (f"Smoothing: {what} applied to no module -- its mappings matched nothing it could fold into in "
                f"this model{'' if m.mappings is None else ' (the recipe gave its own mappings)'}; the "
                f"quantization below ran on the unsmoothed weights.{left}")
    count = f" on {len(applied)} mappings in {layers} decoder layers" if report is not None else ""
    added = [e for e in applied if e.get("added_readers")]
    if added:
        # the module path inside its decoder layer, every expert of a block as one "....experts"
        names = sorted({re.sub(r"experts\.\d+\..*$", "experts", re.sub(r"^.*?\.\d+\.", "", n, count=1))
                        for e in added for n in e["added_readers"]})
        left += (f" {len(added)} of the recipe's mappings were completed with modules that also read the smoothed "
                 f"norm ({', '.join(names)}), so folding the scales does not change the model.")
    return f"Smoothing: {what}{count}, calibrated on {calib}.{left}"


def _copy_model(model):
    import copy

    return copy.deepcopy(model)


def _fingerprint(spec: dict, calibration_spec: dict) -> str:
    """Same owner, model, recipe and data → same fine-tune checkpoints (a resubmitted job resumes)."""
    import hashlib
    import json

    key = {k: spec.get(k) for k in ("owner_id", "model", "recipe", "finetune_data", "data_dir")}
    key["calibration"] = calibration_spec
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
