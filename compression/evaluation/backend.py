"""Which engine produces each evaluation number, and the vLLM check of the exported checkpoint.

`select_backend(device, preference)`:
* ``hf`` — lm-eval's HFLM on the model object in memory: the dense model for the baseline, the
  exported checkpoint loaded through our compressed runtime (kernels/) for the compressed numbers.
  Always used on CPU workers, and for WikiText-2 perplexity.
* ``vllm`` — on a CUDA worker with vLLM installed (the separate vLLM image/venv, since vLLM pins its
  own torch and compressed-tensors): the exported checkpoint is additionally loaded in vLLM, a short
  generation proves it runs there, and the job's lm-eval tasks are scored with lm-eval's vLLM backend.
  Those numbers are reported next to the runtime's, labelled, and the card's Deployment section
  says "Loaded in vLLM x.y on <GPU>". The recovery table stays runtime-vs-dense (same engine both
  sides); a vLLM baseline of the dense model is not computed.

``COMPRESSOR_EVAL_BACKEND``: ``auto`` (default: vllm when possible, else hf), ``hf``, or ``vllm`` (a
worker that cannot use vLLM then fails the job at once, naming the setting).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SETTING = "COMPRESSOR_EVAL_BACKEND"
CHOICES = ("auto", "hf", "vllm")
HF_LABEL = "transformers (lm-eval HFLM)"
RUNTIME_LABEL = "compressed runtime (kernels/) via lm-eval HFLM"


class BackendError(RuntimeError):
    """The configured evaluation backend cannot run on this worker; the message names the setting."""


@dataclass(frozen=True)
class Backend:
    name: str  # "hf" | "vllm"
    reason: str  # why this one was chosen

    def as_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def select_backend(device: str, preference: str | None = None, *, cuda: bool | None = None,
                   vllm: bool | None = None) -> Backend:
    """The backend for a job on ``device`` (``cuda``/``cuda:N``/``cpu``). ``cuda``/``vllm`` default to
    what this process can see (torch.cuda, an importable vllm package)."""
    preference = (preference or os.environ.get(SETTING) or "auto").strip().lower()
    if preference not in CHOICES:
        raise BackendError(f"{SETTING} must be one of {', '.join(CHOICES)}, got {preference!r}")
    if preference == "hf":
        return Backend("hf", f"{SETTING}=hf")
    on_cuda = str(device).startswith("cuda")
    if cuda is None:
        cuda = _cuda_available() if on_cuda else False
    vllm = vllm_installed() if vllm is None else vllm
    missing = ("the worker evaluates on CPU" if not on_cuda else "no CUDA device is visible" if not cuda
               else "vLLM is not installed in this worker's environment (use the vLLM worker image)"
               if not vllm else "")
    if not missing:
        return Backend("vllm", "CUDA worker with vLLM installed")
    if preference == "vllm":
        raise BackendError(f"{SETTING}=vllm, but {missing}; set {SETTING}=auto or hf, or run the job on the "
                           "vLLM worker")
    return Backend("hf", missing)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, no CUDA
        return False


def number_sources(tasks: list[str], backend: Backend, vllm_tasks: list[str] | None = None) -> dict[str, dict]:
    """Which engine produced each number: {task: {"baseline": label, "compressed": label, "vllm": label?}}."""
    out: dict[str, dict] = {}
    for task in tasks:
        entry = {"baseline": "our perplexity loop on the dense model (transformers)" if task == "wikitext2_ppl"
                 else f"{HF_LABEL} on the dense model",
                 "compressed": "our perplexity loop on the compressed runtime (kernels/)" if task == "wikitext2_ppl"
                 else RUNTIME_LABEL}
        if backend.name == "vllm" and task in (vllm_tasks or []):
            entry["vllm"] = "lm-eval vLLM backend on the exported checkpoint"
        out[task] = entry
    return out


# ----------------------------------------------------------------------------- vLLM (GPU workers only)

def vllm_load_check(checkpoint_dir: str | Path, *, max_model_len: int = 2048) -> tuple[Any, dict]:
    """Load the exported checkpoint in vLLM and generate a few tokens; (llm, facts) where facts is
    {"loaded": True, "vllm_version", "gpu", "sample"}. Raises whatever vLLM raises."""
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(checkpoint_dir), max_model_len=max_model_len, gpu_memory_utilization=0.85,
              enforce_eager=True)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8))
    facts = {"loaded": True, "vllm_version": vllm.__version__, "gpu": torch.cuda.get_device_name(0),
             "sample": out[0].outputs[0].text}
    log.info("checkpoint %s loaded in vLLM %s on %s", checkpoint_dir, facts["vllm_version"], facts["gpu"])
    return llm, facts


def vllm_lm(checkpoint_dir: str | Path, *, batch_size: int | str = "auto", max_model_len: int = 2048) -> Any:
    """lm-eval's vLLM model on the exported checkpoint (lm_eval.models.vllm_causallms.VLLM)."""
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(pretrained=str(checkpoint_dir), dtype="auto", batch_size=batch_size, max_model_len=max_model_len,
                gpu_memory_utilization=0.85, enforce_eager=True)
