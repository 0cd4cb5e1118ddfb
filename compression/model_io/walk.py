"""Walking a causal LM one decoder layer at a time: where its layers are and what each one receives.

* :func:`decoder_layers` finds the decoder block list (a ``torch.nn.ModuleList``) of any
  transformers causal LM: the usual paths first, then the ModuleList whose length is
  ``config.num_hidden_layers``.
* :func:`capture_layer_inputs` records, for every calibration sample, the hidden states entering
  layer 0 and the extra arguments *every* layer receives. Models with per-layer attention types
  (Gemma 2/3 sliding vs full attention, GPT-OSS, Cohere2) hand each layer the mask of its own type,
  and Gemma 3 also the rotary embeddings of its type (local vs global RoPE base), so reusing
  layer 0's arguments would be wrong for the other layers. Layers of one type receive the very same
  objects, which are stored once per sample.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Callable

import torch

from compression.errors import UnsupportedModelError

LAYER_LIST_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
                    "model.decoder.layers", "transformer.h", "transformer.layers", "gpt_neox.layers", "layers")
_DROPPED_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(module path, ModuleList) of the decoder layers; ``UnsupportedModelError`` naming what is missing."""
    for prefix in LAYER_LIST_PATHS:
        obj = _get(model, prefix)
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return prefix, obj
    config = getattr(model, "config", None)
    n_layers = getattr(getattr(config, "get_text_config", lambda: config)(), "num_hidden_layers", None)
    if n_layers:
        lists = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
        if len(lists) == 1:
            return lists[0]
    raise UnsupportedModelError(
        f"cannot walk {type(model).__name__}: no decoder layer list (a torch.nn.ModuleList of "
        f"{n_layers or 'num_hidden_layers'} blocks at {', '.join(LAYER_LIST_PATHS[:4])}, ...); "
        "the engine compresses decoder-only causal LMs whose blocks form one ModuleList")


def _to(obj: Any, device: torch.device | str, memo: dict[int, Any]) -> Any:
    """``obj`` with every tensor moved to ``device``; one object moved once (``memo`` by id)."""
    return _map_tensors(obj, lambda t: t.to(device), memo)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], memo: dict[int, Any]) -> Any:
    """``obj`` (tensors in tuples, lists, dicts) with ``fn`` applied to every tensor, each object once."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out: Any = fn(obj)
    elif isinstance(obj, tuple):
        out = tuple(_map_tensors(o, fn, memo) for o in obj)
    elif isinstance(obj, list):
        out = [_map_tensors(o, fn, memo) for o in obj]
    elif isinstance(obj, dict):
        out = {k: _map_tensors(v, fn, memo) for k, v in obj.items()}
    else:
        return obj
    memo[id(obj)] = out
    return out


class _Captured(Exception):
    """Raised by the last layer's stand-in to stop the forward pass once every input is recorded."""


BATCH_TOKENS = 4096  # samples run through a layer together, up to this many tokens per call


class LayerInputs:
    """Per calibration sample: the hidden states entering the current layer, and per layer the
    keyword arguments that layer receives (positional ones are bound to their names).

    ``calls[s][i]`` tensors of layers of the same attention type are shared objects. ``shapes[s]``
    is the sample's batch key: its length when it has no padding (then its per-layer arguments —
    causal mask, positions, rotary embeddings — are those of every unpadded sample of that length),
    else None. :meth:`forward` runs samples with the same key through a layer as one batch.
    """

    def __init__(self, hidden: list[torch.Tensor], calls: list[list[dict]], keys: list[int | None] | None = None):
        self.hidden = hidden
        self.calls = calls
        self.keys = keys if keys is not None else [None] * len(hidden)
        self.batch_tokens = BATCH_TOKENS
        self.compute_device: torch.device | str | None = None  # set: inputs kept on the host, moved per batch

    def __len__(self) -> int:
        return len(self.hidden)

    def __bool__(self) -> bool:
        return bool(self.hidden)

    def pairs(self, index: int) -> list[tuple[torch.Tensor, dict]]:
        """(hidden, kwargs) of every sample for decoder layer ``index``."""
        return [(hidden, calls[index]) for hidden, calls in zip(self.hidden, self.calls)]

    def batches(self) -> list[list[int]]:
        """Sample indices in groups that can share one layer call (same key, ≤ BATCH_TOKENS tokens)."""
        groups: list[list[int]] = []
        open_group: dict[int, list[int]] = {}
        for s, key in enumerate(self.keys):
            if key is None or self.hidden[s].shape[0] != 1:
                groups.append([s])
                continue
            group = open_group.get(key)
            if group is None or (len(group) + 1) * key > self.batch_tokens:
                group = open_group[key] = []
                groups.append(group)
            group.append(s)
        return groups

    def forward(self, layer: torch.nn.Module, index: int) -> list[torch.Tensor]:
        """Run ``layer`` (decoder layer ``index``) on every sample, batching equal unpadded samples;
        its output hidden states, one per sample. Hooks see the batched [B, T, C] inputs."""
        outputs: list[torch.Tensor | None] = [None] * len(self.hidden)
        for group in self.batches():
            hidden = self.hidden[group[0]] if len(group) == 1 else torch.cat([self.hidden[s] for s in group])
            kwargs = self.calls[group[0]][index]
            if self.compute_device is not None:  # offloaded: this batch visits the device, its output comes back
                home = hidden.device
                hidden, kwargs = hidden.to(self.compute_device), _to(kwargs, self.compute_device, {})
                out = layer_output(layer(hidden, **kwargs)).to(home)
            else:
                out = layer_output(layer(hidden, **kwargs))
            for s, row in zip(group, out.split(1) if len(group) > 1 else [out]):
                outputs[s] = row
        return outputs  # type: ignore[return-value]

    def cast(self, dtype: torch.dtype) -> "LayerInputs":
        """The same inputs with every floating-point tensor (hidden states, rotary embeddings, float
        masks) in ``dtype``; tensors shared between samples or layers stay shared."""
        memo: dict[int, Any] = {}

        def fn(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        cast = LayerInputs([_map_tensors(h, fn, memo) for h in self.hidden],
                           [_map_tensors(calls, fn, memo) for calls in self.calls], self.keys)
        cast.batch_tokens, cast.compute_device = self.batch_tokens, self.compute_device
        return cast

    def advanced(self, outputs: list[torch.Tensor]) -> "LayerInputs":
        """The inputs of the next layer: ``outputs`` of this one, with the same per-layer arguments."""
        following = LayerInputs(outputs, self.calls, self.keys)
        following.batch_tokens, following.compute_device = self.batch_tokens, self.compute_device
        return following


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states from a decoder layer's return value (a tensor, or a tuple in older models)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_layer_inputs(model: torch.nn.Module, layers: Sequence[torch.nn.Module], calibration: list[dict],
                         device: torch.device | str) -> LayerInputs:
    """Run each sample through the model with every decoder layer replaced by a recording identity.

    The stand-ins return their input unchanged, so reaching the last layer costs only the embedding
    and the model's mask / rotary set-up; the last one stops the forward pass (no LM head).
    """
    hidden_states: list[torch.Tensor] = []
    calls: list[list[dict]] = []
    keys: list[int | None] = []
    current: list[dict] = []
    memo: dict[int, Any] = {}
    shape: list[torch.Size] = []
    last = len(layers) - 1

    def stand_in(index: int, parameters: list[str]):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if len(args) > 1:  # bind positional extras to their names, so every layer call is (hidden, **kwargs)
                if len(args) - 1 > len(parameters):
                    raise UnsupportedModelError(f"decoder layer {index} of {type(model).__name__} takes "
                                                "variable positional arguments; the engine needs named ones")
                kwargs.update(zip(parameters, args[1:]))
            kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
            kwargs["use_cache"] = False
            if index == 0:
                hidden_states.append(hidden.to(device))
                shape[:] = [hidden.shape]
            elif hidden.shape != shape[0]:
                raise UnsupportedModelError(
                    f"decoder layer {index} of {type(model).__name__} received hidden states of shape "
                    f"{tuple(hidden.shape)} after layer 0 got {tuple(shape[0])}; the engine needs layers "
                    "that pass hidden states of one shape from one to the next")
            current.append(_to(kwargs, device, memo))
            if index == last:
                raise _Captured
            return hidden
        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]  # e.g. an offloading hook's wrapper
    for index, layer in enumerate(layers):
        parameters = [p.name for p in list(inspect.signature(layer.forward).parameters.values())[1:]
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        layer.forward = stand_in(index, parameters)  # instance attribute: nn.Module.__call__ finds it first
    model_device = _first_device(model)
    try:
        for sample in calibration:
            current, memo = [], {}
            ids = sample["input_ids"].to(model_device)
            mask = sample.get("attention_mask")
            try:
                model(input_ids=ids, attention_mask=(torch.ones_like(ids) if mask is None else mask.to(model_device)),
                      use_cache=False)
            except _Captured:
                pass
            if len(current) != len(layers):
                raise UnsupportedModelError(
                    f"{type(model).__name__}'s forward pass reached {len(current)} of its {len(layers)} decoder "
                    "layers; the engine needs every layer called once per forward pass")
            calls.append(current)
            unpadded = ids.shape[0] == 1 and (mask is None or bool(mask.all()))
            keys.append(int(ids.shape[1]) if unpadded else None)
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return LayerInputs(hidden_states, calls, keys)


def _first_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device
