"""The dense model on the job's device for its baseline evaluation and speed measurement.

The engine loads the dense model on the CPU and compresses it one decoder layer at a time on the
job's device. Before that, the baseline evaluation and the dense speed run must also run on the
job's device, or an 8B model's lm-eval takes hours on the CPU and the speed table compares a CPU
dense model with a GPU compressed one. :func:`place_for_eval` decides:

* ``cpu``: the job runs on the CPU; the model stays where it is.
* ``whole``: the model fits the device's free memory (weights x 1.2 + 2 GiB of activations and
  workspace) and is moved there.
* ``layer-by-layer``: it does not fit; embeddings, final norm and LM head go to the device, the
  decoder layers stay on the CPU and each is moved to the device for its own forward pass and back
  right after (forward hooks), so only one layer's weights occupy the device at a time.

:meth:`Placement.restore` moves everything back to the CPU and releases the device's cached memory,
so compression (which moves one layer at a time itself) and the compressed model's load start from
an empty device. :func:`device_free_bytes` is the only place that asks the GPU.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from compression.model_io.walk import decoder_layers

log = logging.getLogger(__name__)

HEADROOM = 1.2
RESERVE_BYTES = 2 * 2 ** 30


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (bytes), or None when unknown/unbounded (meta)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def model_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Placement:
    """Where a dense model was put for evaluation; ``restore`` undoes it."""

    device: str
    mode: str  # "cpu" | "whole" | "layer-by-layer"
    home: str = "cpu"
    handles: list[Any] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {"device": self.device, "mode": self.mode}

    def restore(self, model: torch.nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.mode != "cpu":
            model.to(self.home)
        release_device_memory(self.device)


def release_device_memory(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def place_for_eval(model: torch.nn.Module, device: str | torch.device, *, free_bytes: int | None = None) -> Placement:
    """Put ``model`` (on the CPU) on ``device`` for evaluation; see the module docstring.

    ``free_bytes`` overrides :func:`device_free_bytes` (the layer-by-layer path can then be exercised
    on any device, the CPU included).
    """
    dev = torch.device(device)
    if dev.type == "cpu" and free_bytes is None:
        return Placement(str(dev), "cpu")
    free = device_free_bytes(dev) if free_bytes is None else free_bytes
    need = model_bytes(model) * HEADROOM + RESERVE_BYTES
    if free is None or need <= free:
        model.to(dev)
        log.info("dense model on %s for evaluation (%.1f GB)", dev, model_bytes(model) / 1e9)
        return Placement(str(dev), "whole")
    log.info("dense model (%.1f GB needed) does not fit the %.1f GB free on %s: evaluating layer by layer",
             need / 1e9, free / 1e9, dev)
    return _layer_by_layer(model, dev)


def _layer_by_layer(model: torch.nn.Module, dev: torch.device) -> Placement:
    prefix, layers = decoder_layers(model)
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, torch.nn.ModuleList())  # everything but the decoder layers goes to the device
    try:
        model.to(dev)
    finally:
        setattr(parent, attr, layers)
    home = next(layers[0].parameters()).device
    placement = Placement(str(dev), "layer-by-layer", home=str(home))

    def arrive(module, args, kwargs):
        module.to(dev)

    def leave(module, args, kwargs, output):
        module.to(home)

    for layer in layers:
        placement.handles.append(layer.register_forward_pre_hook(arrive, with_kwargs=True))
        placement.handles.append(layer.register_forward_hook(leave, with_kwargs=True))
    return placement
