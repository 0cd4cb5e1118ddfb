"""Speed and memory of one model in a job: prefill and decode throughput, peak and weight memory.

Measured the same way for the dense baseline and for the compressed model loaded through our
runtime, so the two rows of the card compare like with like:

- prefill: one forward pass over ``prompt_tokens`` tokens (batch 1), tokens per second;
- decode: ``decode_tokens`` single-token steps on the KV cache after that prompt (batch 1, greedy
  shape, random ids: the content does not change the work), tokens per second;
- peak memory: ``torch.cuda.max_memory_allocated`` over the measurement on a CUDA device (weights,
  KV cache and activations); None on the CPU, where the process high-water mark cannot be reset;
- weights: bytes of the model's parameters and buffers as held in memory (packed for the
  compressed model), on any device.

The median of ``repeats`` runs after one warm-up is reported. These are job-level numbers on the
job's device: the kernel-level benchmarks live in bench/kernels.py.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import torch

DEFAULTS = {"prompt_tokens": 128, "decode_tokens": 16, "repeats": 3}


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine() or 'unknown'}, {torch.get_num_threads()} threads)"


def weight_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


@torch.inference_mode()
def measure_speed(model: torch.nn.Module, *, prompt_tokens: int = DEFAULTS["prompt_tokens"],
                  decode_tokens: int = DEFAULTS["decode_tokens"], repeats: int = DEFAULTS["repeats"],
                  seed: int = 0) -> dict[str, Any]:
    """{"prefill_tok_s", "decode_tok_s", "peak_mem_gb", "weights_gb", "prompt_tokens", "decode_tokens"}."""
    if prompt_tokens < 1 or decode_tokens < 1 or repeats < 1:
        raise ValueError("prompt_tokens, decode_tokens and repeats must be at least 1")
    device = _model_device(model)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise ValueError("the model's config has no vocab_size")
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if context and prompt_tokens + decode_tokens > context:  # stay inside the model's positions
        prompt_tokens = max(1, context - decode_tokens)
        decode_tokens = min(decode_tokens, context - prompt_tokens)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=generator).to(device)
    steps = torch.randint(0, vocab, (decode_tokens, 1, 1), generator=generator).to(device)
    was_training = model.training
    model.eval()

    def one_run() -> tuple[float, float]:
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        _sync(device)
        prefill = time.perf_counter() - t0
        past = out.past_key_values
        t0 = time.perf_counter()
        for step in steps:
            out = model(input_ids=step, past_key_values=past, use_cache=True)
            past = out.past_key_values
        _sync(device)
        return prefill, time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        one_run()  # warm-up: kernel compilation, allocator, caches
        runs = [one_run() for _ in range(repeats)]
    finally:
        model.train(was_training)
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"prefill_tok_s": round(prompt_tokens / prefill_s, 2), "decode_tok_s": round(decode_tokens / decode_s, 2),
            "peak_mem_gb": round(peak, 4) if peak is not None else None,
            "weights_gb": round(weight_bytes(model) / 1e9, 6),
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "repeats": repeats}


def speed_summary(dense: dict | None, compressed: dict | None, device: str | torch.device,
                  compressed_name: str) -> dict[str, Any] | None:
    """The job's `speed` result and the card's speed facts: two rows and the decode/prefill speedups."""
    if not dense or not compressed:
        return None

    def ratio(key: str) -> float | None:
        a, b = dense.get(key), compressed.get(key)
        return round(b / a, 3) if a and b else None

    return {"device": device_name(device),
            "rows": [{"name": "dense (baseline)", **dense}, {"name": compressed_name, **compressed}],
            "speedup": ratio("decode_tok_s"), "prefill_speedup": ratio("prefill_tok_s"),
            "weights_ratio": round(dense["weights_gb"] / compressed["weights_gb"], 3)
            if compressed.get("weights_gb") else None}
