"""Distillation fine-tuning of a pruned model with its sparsity mask held (the recipe's finetune stage).

The sparse student (the pruned model) is trained against the dense teacher (a copy of the model
taken before pruning) on packed token windows of a training dataset:

    loss = kl_weight · T² · KL(softmax(teacher / T) ‖ softmax(student / T))      (per token, mean)
         + layer_loss_weight · mean over decoder layers of MSE(student hidden, teacher hidden)

* Mask held: gradients of pruned positions are zeroed before every optimiser step and the weights
  are re-masked after it, so pruned entries stay exactly ``+0.0`` (the 2:4 pattern survives).
* Trained: every parameter of the decoder layers (Linears and norms); the embedding and the
  LM head stay frozen (tied in most small models, and the largest optimiser state).
* Optimiser: AdamW (β 0.9/0.999, no weight decay), linear warm-up over ``warmup_steps``, then cosine
  decay to 10 % of ``lr``. ``optimizer: adamw_8bit`` keeps both moments as block-wise int8 (4×
  less state); ``adamw_offload`` keeps the fp32 state on the CPU (for GPU workers short of memory).
* Budget: ``steps`` optimiser steps, or ``tokens`` (→ steps = ⌈tokens / (batch_size · seq_len ·
  grad_accum)⌉). The dataset must hold that many packed windows (no repetition): too small is an
  error that names the field.
* Memory: ``gradient_checkpointing`` recomputes activations in the backward pass;
  :func:`estimate_memory` is the budget check submission uses.
* Checkpoints: every ``checkpoint_every`` steps, and when cancelled, the trainable weights, the
  optimiser state and the step are written (safetensors + JSON) to ``checkpoint_dir``; a run with
  the same ``fingerprint`` resumes from the last one. The pipeline deletes them when the job succeeds.
* Progress events ``{"stage": "finetune", "kind": "finetune", "step", "steps", "loss", "kl",
  "layer_loss", "tokens", "tokens_per_s", "lr", ...}`` after every step; ``should_stop`` is polled
  between steps and raises ``JobCancelled``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compression.errors import CalibrationError, JobCancelled, RecipeError

log = logging.getLogger(__name__)

MODIFIER = "DistillationFinetuneModifier"
OPTIMIZERS = ("adamw", "adamw_8bit", "adamw_offload")
CHECKPOINT_STATE = "finetune_state.safetensors"
CHECKPOINT_META = "finetune_state.json"
LIMITS = {"steps": (1, 10_000_000), "tokens": (1, 10**13), "batch_size": (1, 4096), "seq_len": (8, 131_072),
          "grad_accum": (1, 4096), "checkpoint_every": (1, 10_000_000), "warmup_steps": (0, 10_000_000),
          "seed": (0, 2**31 - 1)}


@dataclass(frozen=True)
class FinetuneSettings:
    """Arguments of the DistillationFinetuneModifier (one recipe stage of its own)."""

    dataset: str = "calibration/self_instruct_seed_tasks.jsonl"  # calibration-source syntax
    tokens: int | None = None
    steps: int | None = None
    lr: float = 1e-5
    batch_size: int = 4
    seq_len: int = 512
    grad_accum: int = 1
    temperature: float = 1.0
    kl_weight: float = 1.0
    layer_loss_weight: float = 0.0
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    warmup_steps: int = 0
    checkpoint_every: int = 100
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil((self.tokens or 0) / self.tokens_per_step))

    @property
    def windows_needed(self) -> int:
        return self.total_steps * self.batch_size * self.grad_accum

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        return (f"distillation fine-tune, {self.total_steps} steps × {self.tokens_per_step} tokens "
                f"({self.total_steps * self.tokens_per_step:,} tokens) of {self.dataset}, lr {self.lr:g}")


def parse_settings(raw: Any, path: str) -> FinetuneSettings:
    """The modifier's arguments → FinetuneSettings; ``RecipeError`` names the bad field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(path, f"{MODIFIER} arguments must be a mapping")
    allowed = {f for f in FinetuneSettings.__dataclass_fields__}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise RecipeError(f"{path}.{unknown[0]}", f"unknown field for {MODIFIER}; allowed: {', '.join(sorted(allowed))}")
    values = {**FinetuneSettings().to_dict(), "tokens": None, "steps": None, **raw}
    if (values["tokens"] is None) == (values["steps"] is None):
        raise RecipeError(f"{path}.tokens", "give exactly one of 'tokens' (training token budget) or 'steps'")
    for key, (lo, hi) in LIMITS.items():
        v = values.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise RecipeError(f"{path}.{key}", f"must be an integer between {lo} and {hi}")
    for key, lo, hi in (("lr", 1e-9, 1.0), ("temperature", 0.05, 100.0), ("kl_weight", 0.0, 1000.0),
                        ("layer_loss_weight", 0.0, 1000.0)):
        v = values[key]
        if isinstance(v, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise RecipeError(f"{path}.{key}", f"must be a number between {lo:g} and {hi:g}")
        values[key] = float(v)
    if values["kl_weight"] == 0 and values["layer_loss_weight"] == 0:
        raise RecipeError(f"{path}.kl_weight", "kl_weight and layer_loss_weight cannot both be 0 (nothing to learn)")
    if values["gradient_checkpointing"] not in (True, False):
        raise RecipeError(f"{path}.gradient_checkpointing", "must be true or false")
    if values["optimizer"] not in OPTIMIZERS:
        raise RecipeError(f"{path}.optimizer", f"allowed: {', '.join(OPTIMIZERS)}")
    if not isinstance(values["dataset"], str) or not values["dataset"].strip() or len(values["dataset"]) > 500:
        raise RecipeError(f"{path}.dataset", "a data-directory file, upload:<id> or a Hub dataset id org/name[:split]")
    return FinetuneSettings(**values)


# ------------------------------------------------------------------------------------------ data
def load_training_windows(source: str, tokenizer: Any, *, windows: int, seq_len: int,
                          data_dir: str | os.PathLike, seed: int = 0,
                          field: str = "finetune.dataset") -> torch.Tensor:
    """``windows`` packed windows [windows, seq_len] of the dataset's text (records joined with EOS,
    shuffled with ``seed``); raises CalibrationError(field) if the dataset holds fewer tokens."""
    from compression.calibration import _load_hub_dataset, _local_records, classify_source

    try:
        where = classify_source(source, data_dir)
    except CalibrationError as exc:
        raise CalibrationError(exc.message, field) from None
    if where.kind == "file":
        records = _local_records(where.path)
        random.Random(seed).shuffle(records)
    else:
        records = _load_hub_dataset(where.repo_id, where.split, seed, max(1000, windows * 8))
    need = windows * seq_len
    ids: list[int] = []
    for record in records:
        ids.extend(record_token_ids(record, tokenizer))
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise CalibrationError(
            f"the training dataset {source!r} holds {len(ids):,} tokens; the budget needs {need:,} "
            f"({windows} windows of {seq_len}). Lower tokens/steps or use a larger dataset", field)
    return torch.tensor(ids[:need], dtype=torch.long).view(windows, seq_len)


def record_token_ids(record: Any, tokenizer: Any) -> list[int]:
    """The token ids one dataset record adds to the packed training stream: its text (through the
    chat template when it has ``messages`` and the tokenizer one) and an EOS separator. Submission
    counts a local dataset with this, so it refuses exactly what the worker would."""
    from compression.calibration import record_text

    text, templated = record_text(record, tokenizer)
    if not text.strip():
        return []
    ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + [int(eos)] if eos is not None else ids


# Per record, what a tokenizer may add beyond one token per UTF-8 byte of the text: BOS, EOS and a
# SentencePiece word-start piece; without the tokenizer, a chat template's role headers and default
# system prompt too (a generous allowance: SmolLM2's adds ~25 tokens to a two-message record).
RECORD_SPECIAL_TOKENS = 4
CHAT_TEMPLATE_ALLOWANCE = 64
CHAT_MESSAGE_ALLOWANCE = 16
# Submission tokenizes at most this many tokens of a dataset exactly (a few seconds); the rest of a
# larger file is bounded from above instead.
EXACT_COUNT_TOKENS = 2 ** 21


def record_tokens_bound(record: Any, tokenizer: Any = None) -> int:
    """A conservative upper bound of ``len(record_token_ids(record, tokenizer))`` without tokenizing:
    a token covers at least one UTF-8 byte, plus the special tokens; with no tokenizer a chat
    record gets an allowance for the template it would be rendered through."""
    from compression.calibration import record_text

    text, _ = record_text(record, tokenizer)
    messages = isinstance(record, dict) and bool(record.get("messages"))
    if tokenizer is None and messages:
        count = len(record["messages"]) if isinstance(record["messages"], list) else 1
        return len(text.encode("utf-8")) + RECORD_SPECIAL_TOKENS + CHAT_TEMPLATE_ALLOWANCE \
            + CHAT_MESSAGE_ALLOWANCE * count
    if not text.strip():
        return 0
    return len(text.encode("utf-8")) + RECORD_SPECIAL_TOKENS


def count_training_tokens(records: list[Any], tokenizer: Any, need: int, *,
                          exact_tokens: int = EXACT_COUNT_TOKENS) -> tuple[int, bool]:
    """(tokens, exact): the packed training tokens ``records`` give, counted as the worker packs them
    (record_token_ids) and stopping once ``need`` is reached. Past ``exact_tokens`` counted tokens the
    remaining records are bounded from above (record_tokens_bound) instead, and ``exact`` is False."""
    total, exact = 0, True
    for record in records:
        if total >= need:
            break
        if total < exact_tokens:
            total += len(record_token_ids(record, tokenizer))
        else:
            total += record_tokens_bound(record, tokenizer)
            exact = False
    return total, exact


# ------------------------------------------------------------------------------------ optimisers
class _Adam8bitState:
    """One moment tensor stored as int8 with one fp32 absmax scale per block of 256 values."""

    BLOCK = 256

    def __init__(self, like: torch.Tensor, unsigned: bool):
        n = like.numel()
        self.shape, self.numel, self.unsigned = like.shape, n, unsigned
        blocks = (n + self.BLOCK - 1) // self.BLOCK
        self.codes = torch.zeros(blocks * self.BLOCK, dtype=torch.uint8 if unsigned else torch.int8,
                                 device=like.device)
        self.scale = torch.zeros(blocks, 1, dtype=torch.float32, device=like.device)

    def get(self) -> torch.Tensor:
        q = self.codes.view(-1, self.BLOCK).float() / (255.0 if self.unsigned else 127.0)
        x = q * self.scale
        if self.unsigned:  # the second moment is stored as sqrt(v): int8 keeps its dynamic range better
            x = x * x
        return x.flatten()[: self.numel].view(self.shape)

    def set(self, x: torch.Tensor) -> None:
        flat = torch.zeros(self.codes.numel(), dtype=torch.float32, device=x.device)
        flat[: self.numel] = (x.sqrt() if self.unsigned else x).flatten().float()
        blocks = flat.view(-1, self.BLOCK)
        self.scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        top = 255.0 if self.unsigned else 127.0
        self.codes = torch.round(blocks / self.scale * top).to(self.codes.dtype).flatten()


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW (no weight decay) with fp32 state on the parameter's device (``adamw``), block-wise int8
    moments (``adamw_8bit``) or fp32 state and update on the CPU (``adamw_offload``)."""

    def __init__(self, params, lr: float, mode: str = "adamw", betas=(0.9, 0.999), eps: float = 1e-8):
        if mode not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {mode!r}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.mode = mode

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim API
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                where = torch.device("cpu") if self.mode == "adamw_offload" else p.device
                grad = p.grad.detach().to(where, torch.float32)
                if not state:
                    state["step"] = 0
                    if self.mode == "adamw_8bit":
                        state["m8"] = _Adam8bitState(grad, unsigned=False)
                        state["v8"] = _Adam8bitState(grad, unsigned=True)
                    else:
                        state["m"] = torch.zeros_like(grad)
                        state["v"] = torch.zeros_like(grad)
                    if self.mode == "adamw_offload" or p.dtype != torch.float32:
                        state["master"] = p.detach().to(where, torch.float32).clone()
                state["step"] += 1
                m = state["m8"].get() if self.mode == "adamw_8bit" else state["m"]
                v = state["v8"].get() if self.mode == "adamw_8bit" else state["v"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if self.mode == "adamw_8bit":
                    state["m8"].set(m)
                    state["v8"].set(v)
                t = state["step"]
                denom = (v / (1 - beta2 ** t)).sqrt().add_(group["eps"])
                update = (m / (1 - beta1 ** t)) / denom * group["lr"]
                master = state.get("master")
                if master is not None:
                    master.sub_(update)
                    p.copy_(master.to(p.device, p.dtype))
                else:
                    p.sub_(update.to(p.device))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat {name: tensor} of the state (for a safetensors checkpoint)."""
        out: dict[str, torch.Tensor] = {}
        for i, p in enumerate(self.param_groups[0]["params"]):
            state = self.state.get(p) or {}
            for key, value in state.items():
                if isinstance(value, _Adam8bitState):
                    out[f"{i}.{key}.codes"], out[f"{i}.{key}.scale"] = value.codes.cpu(), value.scale.cpu()
                elif isinstance(value, torch.Tensor):
                    out[f"{i}.{key}"] = value.cpu()
                else:
                    out[f"{i}.{key}"] = torch.tensor([value], dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, p in enumerate(self.param_groups[0]["params"]):
            if f"{i}.step" not in tensors:
                continue
            where = torch.device("cpu") if self.mode == "adamw_offload" else p.device
            state = {"step": int(tensors[f"{i}.step"][0])}
            for key in ("m", "v", "master"):
                if f"{i}.{key}" in tensors:
                    state[key] = tensors[f"{i}.{key}"].to(where)
            for key, unsigned in (("m8", False), ("v8", True)):
                if f"{i}.{key}.codes" in tensors:
                    s = _Adam8bitState(p.detach().float(), unsigned)
                    s.codes, s.scale = tensors[f"{i}.{key}.codes"].to(where), tensors[f"{i}.{key}.scale"].to(where)
                    state[key] = s
            self.state[p] = state


def lr_at(step: int, settings: FinetuneSettings) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to 10 % of it."""
    total = settings.total_steps
    if settings.warmup_steps and step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(total - settings.warmup_steps, 1)
    progress = min(max(step - settings.warmup_steps, 0) / span, 1.0)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------- memory budget
def estimate_memory(*, params: int, layer_params: int, layers: int, hidden: int, vocab: int,
                    settings: FinetuneSettings, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes the fine-tune needs on the training device (student, teacher, grads, optimiser,
    activations, logits). A deliberate upper estimate for the submission check."""
    trainable = layers * layer_params
    weights = 2 * params * dtype_bytes  # student + teacher
    grads = trainable * 4
    optimizer = {"adamw": 8, "adamw_8bit": 2, "adamw_offload": 0}[settings.optimizer] * trainable
    if settings.optimizer == "adamw_offload" or dtype_bytes != 4:
        optimizer += 0 if settings.optimizer == "adamw_offload" else 4 * trainable  # fp32 master copy
    tokens = settings.batch_size * settings.seq_len
    per_layer = tokens * hidden * 4 * 18  # attention + MLP intermediates kept for the backward pass
    activations = tokens * hidden * 4 * layers + per_layer if settings.gradient_checkpointing else per_layer * layers
    logits = tokens * vocab * 4 * 4  # student + teacher logits, their log-softmax and the gradient
    total = weights + grads + optimizer + activations + logits
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations,
            "logits": logits, "total": total}


def check_memory(model_config: Any, settings: FinetuneSettings, memory_bytes: int, path: str) -> dict[str, int]:
    """Raise RecipeError naming the field to change when the fine-tune would not fit ``memory_bytes``."""
    def cfg(key, default=None):
        return getattr(model_config, key, None) if not isinstance(model_config, dict) else model_config.get(key, default)

    hidden = int(cfg("hidden_size") or 0)
    layers = int(cfg("num_hidden_layers") or 0)
    inter = int(cfg("intermediate_size") or 4 * hidden)
    heads = int(cfg("num_attention_heads") or 1)
    kv = int(cfg("num_key_value_heads") or heads)
    vocab = int(cfg("vocab_size") or 0)
    head_dim = int(cfg("head_dim") or (hidden // max(heads, 1)))
    layer_params = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter + 2 * hidden
    tied = bool(cfg("tie_word_embeddings", False))
    params = layers * layer_params + vocab * hidden * (1 if tied else 2)
    dtype = str(cfg("torch_dtype", "") or cfg("dtype", "") or "")
    dtype_bytes = 2 if dtype.endswith(("bfloat16", "float16")) else 4
    need = estimate_memory(params=params, layer_params=layer_params, layers=layers, hidden=hidden, vocab=vocab,
                           settings=settings, dtype_bytes=dtype_bytes)
    if need["total"] > memory_bytes:
        gib = 2 ** 30
        hints = []
        if not settings.gradient_checkpointing:
            hints.append("gradient_checkpointing: true")
        if settings.optimizer == "adamw":
            hints.append("optimizer: adamw_8bit or adamw_offload")
        hints.append("a smaller batch_size (with more grad_accum) or seq_len")
        field_name = "batch_size" if settings.gradient_checkpointing and settings.optimizer != "adamw" else (
            "gradient_checkpointing" if not settings.gradient_checkpointing else "optimizer")
        raise RecipeError(f"{path}.{field_name}",
                          f"the fine-tune needs about {need['total'] / gib:.1f} GiB (weights "
                          f"{need['weights'] / gib:.1f}, optimiser {need['optimizer'] / gib:.1f}, activations "
                          f"{need['activations'] / gib:.1f}, logits {need['logits'] / gib:.1f}) but the worker has "
                          f"{memory_bytes / gib:.1f} GiB; try {', '.join(hints)}")
    return need


# --------------------------------------------------------------------------------------- training
@dataclass
class FinetuneResult:
    steps: int
    tokens: int
    seconds: float
    resumed_from: int
    losses: list[dict] = field(default_factory=list)  # one {"step", "loss", "kl", "layer_loss", "lr"} per step

    def summary(self) -> dict:
        first = self.losses[0]["loss"] if self.losses else None
        last = self.losses[-1]["loss"] if self.losses else None
        return {"steps": self.steps, "tokens": self.tokens, "seconds": round(self.seconds, 2),
                "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else None,
                "resumed_from_step": self.resumed_from, "first_loss": first, "last_loss": last,
                "losses": self.losses}


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    from compression.sequential import decoder_layers

    prefix, layers = decoder_layers(model)
    return [(f"{prefix}.{name}", p) for name, p in layers.named_parameters()]


def _fingerprint_ok(meta: dict, fingerprint: str | None) -> bool:
    return fingerprint is not None and meta.get("fingerprint") == fingerprint


def save_checkpoint(directory: Path, model_params: list[tuple[str, torch.nn.Parameter]], optimizer: MaskedAdamW,
                    step: int, tokens: int, losses: list[dict], fingerprint: str | None) -> None:
    """Write the trainable weights + optimiser state atomically (temp files, then rename)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{name}": p.detach().cpu().contiguous() for name, p in model_params}
    tensors.update({f"optim.{k}": v.contiguous() for k, v in optimizer.state_tensors().items()})
    tmp_state, tmp_meta = directory / (CHECKPOINT_STATE + ".tmp"), directory / (CHECKPOINT_META + ".tmp")
    save_file(tensors, str(tmp_state))
    tmp_meta.write_text(json.dumps({"step": step, "tokens": tokens, "losses": losses, "fingerprint": fingerprint}))
    os.replace(tmp_state, directory / CHECKPOINT_STATE)
    os.replace(tmp_meta, directory / CHECKPOINT_META)


def load_checkpoint(directory: Path | None, fingerprint: str | None) -> tuple[dict, dict] | None:
    """(meta, tensors) of a checkpoint in ``directory`` written for ``fingerprint``, else None."""
    if directory is None:
        return None
    meta_path, state_path = Path(directory) / CHECKPOINT_META, Path(directory) / CHECKPOINT_STATE
    if not meta_path.is_file() or not state_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not _fingerprint_ok(meta, fingerprint):
        log.warning("ignoring fine-tune checkpoint in %s: written for another job", directory)
        return None
    from safetensors.torch import load_file

    return meta, load_file(str(state_path))


def remove_checkpoints(directory: Path | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def finetune(student: torch.nn.Module, teacher: torch.nn.Module, windows: torch.Tensor,
             masks: dict[str, torch.Tensor], settings: FinetuneSettings, *,
             progress: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
             checkpoint_dir: str | Path | None = None, fingerprint: str | None = None) -> FinetuneResult:
    """Train ``student`` in place against ``teacher``; see the module docstring.

    ``windows``: LongTensor [n, seq_len] with n ≥ settings.windows_needed. ``masks``: {parameter
    name (``model.layers.0.mlp.up_proj``): bool mask, True = pruned} of every pruned Linear.
    """
    if windows.shape[0] < settings.windows_needed:
        raise CalibrationError(f"{windows.shape[0]} training windows for a budget of {settings.windows_needed}",
                               "finetune.tokens")
    emit = progress or (lambda event: None)
    device = next(student.parameters()).device
    params = _trainable(student)
    names = {name for name, _ in params}
    held = {}
    for module_name, mask in masks.items():
        key = f"{module_name}.weight"
        if key not in names:
            raise ValueError(f"mask for {module_name} names no trainable weight")
        held[dict(params)[key]] = mask.to(device, torch.bool)
    trainable_ids = {id(p) for _, p in params}
    frozen = [(p, p.requires_grad) for p in student.parameters() if id(p) not in trainable_ids]
    for p, _ in frozen:
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = MaskedAdamW([p for _, p in params], lr=settings.lr, mode=settings.optimizer)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    start_step, tokens_seen, losses = 0, 0, []
    resumed = load_checkpoint(checkpoint_dir, fingerprint)
    if resumed is not None:
        meta, tensors = resumed
        with torch.no_grad():
            for name, p in params:
                p.copy_(tensors[f"param.{name}"].to(p.device, p.dtype))
        optimizer.load_state_tensors({k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")})
        start_step, tokens_seen, losses = int(meta["step"]), int(meta["tokens"]), list(meta.get("losses") or [])
        emit({"stage": "finetune", "kind": "finetune", "step": start_step, "steps": settings.total_steps,
              "message": f"resumed the fine-tune from its checkpoint at step {start_step}"})
    _apply(held)
    was_training = student.training
    use_cache = getattr(student.config, "use_cache", None)
    student.config.use_cache = False
    if settings.gradient_checkpointing:
        _checkpointing(student, True)
    student.train()
    started = time.perf_counter()
    micro = settings.batch_size
    total = settings.total_steps
    last_saved = start_step
    try:
        with torch.enable_grad():
            for step in range(start_step, total):
                if should_stop is not None and should_stop():
                    if checkpoint_dir is not None and step > last_saved:
                        save_checkpoint(checkpoint_dir, params, optimizer, step, tokens_seen, losses, fingerprint)
                    raise JobCancelled(f"fine-tune cancelled at step {step}/{total}"
                                       + (f"; checkpoint kept at step {step}" if checkpoint_dir else ""))
                t0 = time.perf_counter()
                lr = lr_at(step, settings)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                sums = {"loss": 0.0, "kl": 0.0, "layer_loss": 0.0}
                for a in range(settings.grad_accum):
                    first = (step * settings.grad_accum + a) * micro
                    batch = windows[first:first + micro].to(device)
                    parts = _distill_loss(student, teacher, batch, settings)
                    (parts["loss"] / settings.grad_accum).backward()
                    for k in sums:
                        sums[k] += float(parts[k].detach()) / settings.grad_accum
                _mask_grads(held)
                optimizer.step()
                _apply(held)
                tokens_seen += settings.tokens_per_step
                seconds = time.perf_counter() - t0
                record = {"step": step + 1, "lr": lr, **{k: round(v, 6) for k, v in sums.items()}}
                losses.append(record)
                emit({"stage": "finetune", "kind": "finetune", "steps": total, "tokens": tokens_seen,
                      "tokens_per_s": round(settings.tokens_per_step / seconds, 2) if seconds else None,
                      **record, "message": f"fine-tune step {step + 1}/{total}: loss {sums['loss']:.4f}"})
                if checkpoint_dir is not None and (step + 1) % settings.checkpoint_every == 0 and step + 1 < total:
                    save_checkpoint(checkpoint_dir, params, optimizer, step + 1, tokens_seen, losses, fingerprint)
                    last_saved = step + 1
    finally:
        if settings.gradient_checkpointing:
            _checkpointing(student, False)
        student.train(was_training)
        if use_cache is not None:
            student.config.use_cache = use_cache
        for _, p in params:
            p.requires_grad_(False)
        for p, flag in frozen:
            p.requires_grad_(flag)
        _apply(held)
    return FinetuneResult(total - start_step, tokens_seen, time.perf_counter() - started, start_step, losses)


def _distill_loss(student, teacher, batch: torch.Tensor, settings: FinetuneSettings) -> dict[str, torch.Tensor]:
    hidden = settings.layer_loss_weight > 0
    with torch.no_grad():
        t_out = teacher(input_ids=batch, output_hidden_states=hidden, use_cache=False)
    s_out = student(input_ids=batch, output_hidden_states=hidden, use_cache=False)
    temp = settings.temperature
    s_logp = F.log_softmax(s_out.logits.float() / temp, dim=-1).flatten(0, 1)
    t_logp = F.log_softmax(t_out.logits.float() / temp, dim=-1).flatten(0, 1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * temp * temp
    layer_loss = torch.zeros((), device=kl.device)
    if hidden:
        pairs = list(zip(s_out.hidden_states[1:], t_out.hidden_states[1:]))
        layer_loss = sum(F.mse_loss(s.float(), t.float()) for s, t in pairs) / len(pairs)
    loss = settings.kl_weight * kl + settings.layer_loss_weight * layer_loss
    return {"loss": loss, "kl": kl.detach(), "layer_loss": layer_loss.detach()}


def _checkpointing(model, on: bool) -> None:
    """Gradient (activation) checkpointing on/off, under either name transformers uses."""
    name = ("activation_checkpointing_" if hasattr(model, "activation_checkpointing_enable")
            else "gradient_checkpointing_") + ("enable" if on else "disable")
    method = getattr(model, name, None)
    if method is None:
        log.warning("%s has no gradient checkpointing; training without it", type(model).__name__)
    elif on:
        key = name.replace("_enable", "_kwargs")
        method(**{key: {"use_reentrant": False}})
    else:
        method()


def _mask_grads(held: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    for p, mask in held.items():
        if p.grad is not None:
            p.grad.masked_fill_(mask, 0.0)


def _apply(held: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    with torch.no_grad():
        for p, mask in held.items():
            p.masked_fill_(mask, 0.0)
