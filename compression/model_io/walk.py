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
* With ``padding=True`` samples of similar length are captured as right-padded batches: the model
  itself builds each batch's masks, positions and rotary tables from its ``attention_mask``, and
  :class:`LayerInputs` keeps the batch's token mask. While a layer runs on a padded batch the mask
  is visible to hooks (:func:`token_mask`, :func:`valid_rows`), so every statistic can skip the pad
  positions; with right padding and causal attention no real token ever attends to a pad position.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Callable

import torch

from compression.errors import UnsupportedModelError

LAYER_LIST_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
                    "model.decoder.layers", "transformer.h", "transformer.layers", "gpt_neox.layers", "layers")
# the names under which transformers families pass a layer its KV cache (transformers 5; older families)
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


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
MAX_PADDING = 0.25  # a padded batch holds at most this fraction of pad positions

_TOKEN_MASK: ContextVar["torch.Tensor | None"] = ContextVar("compression_token_mask", default=None)


def token_mask() -> torch.Tensor | None:
    """The ``[B, T]`` bool mask (True = a token of a sample, False = padding) of the calibration batch
    the current layer call runs on; None when every position is a token."""
    return _TOKEN_MASK.get()


@contextlib.contextmanager
def masking(mask: torch.Tensor | None) -> Iterator[None]:
    """Make ``mask`` the :func:`token_mask` of the layer calls inside the block."""
    reset = _TOKEN_MASK.set(mask)
    try:
        yield
    finally:
        _TOKEN_MASK.reset(reset)


class PaddingMismatch(RuntimeError):
    """A hook saw a tensor that is not laid out token by token like the padded batch's mask."""


def valid_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows ``[N, C]`` of ``x`` that are tokens, the number of sequences they come from) for an
    input ``x`` of the current layer call: ``[B, T, C]`` or ``[B*T, C]`` (an MoE block's flattened
    tokens). Without a padded batch every row counts and a 2-D ``x`` is one sequence (as before)."""
    mask = _TOKEN_MASK.get()
    flat = x.reshape(-1, x.shape[-1])
    if mask is None:
        return flat, (x.shape[0] if x.dim() > 2 else 1)
    aligned = tuple(x.shape[:2]) == tuple(mask.shape) if x.dim() == 3 else (x.dim() == 2 and x.shape[0] == mask.numel())
    if not aligned:
        raise PaddingMismatch(f"a tensor of shape {tuple(x.shape)} in a padded calibration batch of shape "
                              f"{tuple(mask.shape)} is not laid out token by token; it cannot skip the padding")
    return flat[mask.reshape(-1).to(x.device)], int(mask.shape[0])


def padded_groups(lengths: Sequence[int], batch_tokens: int = BATCH_TOKENS,
                  max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices of samples of these lengths, longest first, in groups that run as one right-padded
    batch: a group grows while its padded size (samples x its longest length) stays within
    ``batch_tokens`` and its pad positions within ``max_padding`` of that size."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if groups:
            group = groups[-1]
            longest = lengths[group[0]]
            size = (len(group) + 1) * longest
            pad = sum(longest - lengths[j] for j in group) + longest - lengths[i]
            if size <= batch_tokens and pad <= max_padding * size:
                group.append(i)
                continue
        groups.append([i])
    return groups


class LayerInputs:
    """Per calibration unit — one sample, or (captured with ``padding``) a right-padded batch of
    samples — the hidden states entering the current layer, and per layer the keyword arguments
    that layer receives (positional ones are bound to their names).

    ``calls[u][i]`` tensors of layers of the same attention type are shared objects. ``keys[u]``
    is the unit's batch key: its length when it is one sample without padding (then its per-layer
    arguments — causal mask, positions, rotary embeddings — are those of every unpadded sample of
    that length), else None. ``masks[u]`` is the ``[B, T]`` token mask of a padded unit (None: no
    padding). :meth:`forward` runs units with the same key through a layer as one batch, and a
    padded unit with its mask as the :func:`token_mask` of the call.
    """

    def __init__(self, hidden: list[torch.Tensor], calls: list[list[dict]], keys: list[int | None] | None = None,
                 masks: list[torch.Tensor | None] | None = None, members: list[list[int]] | None = None):
        self.hidden = hidden
        self.calls = calls
        self.keys = keys if keys is not None else [None] * len(hidden)
        self.masks = masks if masks is not None else [None] * len(hidden)
        self.members = members if members is not None else [[u] for u in range(len(hidden))]  # sample per row
        self.batch_tokens = BATCH_TOKENS
        self.compute_device: torch.device | str | None = None  # set: inputs kept on the host, moved per batch

    def __len__(self) -> int:
        return len(self.hidden)

    def __bool__(self) -> bool:
        return bool(self.hidden)

    @property
    def padded(self) -> bool:
        """Whether any unit is a batch with pad positions."""
        return any(m is not None for m in self.masks)

    def pairs(self, index: int) -> list[tuple[torch.Tensor, dict]]:
        """(hidden, kwargs) of every sample for decoder layer ``index``; only for inputs without
        padded units (their pad positions would count as tokens)."""
        if self.padded:
            raise RuntimeError("these calibration inputs hold padded batches; replaying them needs the token "
                               "masks (LayerInputs.forward / units)")
        return [(hidden, calls[index]) for hidden, calls in zip(self.hidden, self.calls)]

    def units(self, index: int) -> list[tuple[torch.Tensor, dict, torch.Tensor | None]]:
        """(hidden, kwargs, token mask or None) of every unit for decoder layer ``index``."""
        return [(hidden, calls[index], mask) for hidden, calls, mask in zip(self.hidden, self.calls, self.masks)]

    def batches(self) -> list[list[int]]:
        """Unit indices in groups that can share one layer call (same key, ≤ ``batch_tokens`` tokens)."""
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

    def consolidate(self) -> "LayerInputs":
        """Hold every unit's hidden states in one flat buffer (each unit a view into it), so that the
        activations are one allocation, not hundreds of heap blocks between the layer's temporaries
        (which left the heap fragmented, holding freed memory resident). Returns ``self``."""
        hidden = self.hidden
        if not hidden or any(h is None or h.dtype != hidden[0].dtype or h.device != hidden[0].device
                             for h in hidden):
            return self
        flat = torch.empty(sum(h.numel() for h in hidden), dtype=hidden[0].dtype, device=hidden[0].device)
        offset = 0
        for u, h in enumerate(hidden):
            view = flat[offset:offset + h.numel()].view(h.shape)
            view.copy_(h)
            hidden[u] = view
            offset += h.numel()
        return self

    def forward(self, layer: torch.nn.Module, index: int, *, extra: dict | None = None,
                keep: bool = True, in_place: bool = False) -> list[torch.Tensor]:
        """Run ``layer`` (decoder layer ``index``) on every unit, batching equal unpadded samples;
        its output hidden states, one per unit (pad positions zeroed), or none with ``keep=False``.
        Hooks see the batched [B, T, C] inputs and, for a padded unit, its :func:`token_mask`.
        ``extra``: keyword arguments added to every call. ``in_place``: these inputs are used up (only
        the outputs are needed afterwards): each unit's output is written over its own hidden states
        once its batch has run (where shape and dtype agree), so no second set of activations is
        allocated; the returned tensors are then this object's own (which now holds the outputs)."""
        outputs: list[torch.Tensor | None] = [None] * len(self.hidden)
        for group in self.batches():
            hidden = self.hidden[group[0]] if len(group) == 1 else torch.cat([self.hidden[s] for s in group])
            mask = self.masks[group[0]] if len(group) == 1 else None
            kwargs = self.calls[group[0]][index]
            home = hidden.device
            if self.compute_device is not None:  # offloaded: this batch visits the device, its output comes back
                hidden, kwargs = hidden.to(self.compute_device), _to(kwargs, self.compute_device, {})
                mask = None if mask is None else mask.to(self.compute_device)
            if extra:
                kwargs = {**kwargs, **extra}
            with masking(mask):
                out = layer_output(layer(hidden, **kwargs))
            if not keep:
                continue
            if mask is not None:  # pad positions stay finite and inert, whatever the layer made of them
                out = out.masked_fill(~mask.to(out.device).unsqueeze(-1), 0)
            if not in_place:
                out = out.to(home)
            for s, row in zip(group, out.split(1) if len(group) > 1 else [out]):
                own = self.hidden[s]
                if in_place and row.shape == own.shape and row.dtype == own.dtype:
                    outputs[s] = own.copy_(row)
                else:
                    outputs[s] = row.to(home)
        return outputs  # type: ignore[return-value]

    def per_sample(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``outputs`` (one per unit, as :meth:`forward` returns them) un-padded: one ``[1, T, C]``
        tensor per calibration sample, in calibration order."""
        samples: dict[int, torch.Tensor] = {}
        for out, mask, members in zip(outputs, self.masks, self.members):
            if len(members) == 1:  # one sample, as it came (with any padding of its own)
                samples[members[0]] = out
                continue
            for row, sample in enumerate(members):  # a batch this capture padded on the right
                samples[sample] = out[row:row + 1] if mask is None else out[row:row + 1, :int(mask[row].sum())]
        return [samples[s] for s in sorted(samples)]

    def _derived(self, hidden: list[torch.Tensor], calls: list[list[dict]]) -> "LayerInputs":
        following = LayerInputs(hidden, calls, self.keys, self.masks, self.members)
        following.batch_tokens, following.compute_device = self.batch_tokens, self.compute_device
        return following

    def cast(self, dtype: torch.dtype) -> "LayerInputs":
        """The same inputs with every floating-point tensor (hidden states, rotary embeddings, float
        masks) in ``dtype``; tensors shared between samples or layers stay shared."""
        memo: dict[int, Any] = {}

        def fn(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        return self._derived([_map_tensors(h, fn, memo) for h in self.hidden],
                             [_map_tensors(calls, fn, memo) for calls in self.calls])

    def advanced(self, outputs: list[torch.Tensor]) -> "LayerInputs":
        """The inputs of the next layer: ``outputs`` of this one, with the same per-layer arguments."""
        return self._derived(outputs, self.calls)


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states from a decoder layer's return value (a tensor, or a tuple in older models)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _padded_batches(calibration: list[dict], padding: bool, batch_tokens: int, max_padding: float,
                    pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor | None, list[int]]]:
    """(input_ids, attention_mask or None, sample indices) of every forward pass the capture runs:
    each sample alone, or with ``padding`` the unpadded single-row samples in right-padded groups
    (:func:`padded_groups`)."""
    if not padding:
        return [(s["input_ids"], s.get("attention_mask"), [i]) for i, s in enumerate(calibration)]
    plain = [i for i, s in enumerate(calibration) if s["input_ids"].shape[0] == 1
             and (s.get("attention_mask") is None or bool(s["attention_mask"].all()))]
    plain_set = set(plain)
    batches = [(s["input_ids"], s.get("attention_mask"), [i]) for i, s in enumerate(calibration)
               if i not in plain_set]
    lengths = [int(calibration[i]["input_ids"].shape[1]) for i in plain]
    for group in padded_groups(lengths, batch_tokens, max_padding):
        if len(group) == 1:
            batches.append((calibration[plain[group[0]]]["input_ids"], None, [plain[group[0]]]))
            continue
        longest = lengths[group[0]]
        ids = torch.full((len(group), longest), pad_id, dtype=calibration[plain[group[0]]]["input_ids"].dtype)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for row, g in enumerate(group):
            ids[row, :lengths[g]] = calibration[plain[g]]["input_ids"][0]
            mask[row, :lengths[g]] = 1
        batches.append((ids, mask, [plain[g] for g in group]))
    return batches


def _pad_id(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)()
    pad, vocab = getattr(text, "pad_token_id", None), getattr(text, "vocab_size", None)
    return pad if isinstance(pad, int) and pad >= 0 and (vocab is None or pad < vocab) else 0


@torch.no_grad()
def capture_layer_inputs(model: torch.nn.Module, layers: Sequence[torch.nn.Module], calibration: list[dict],
                         device: torch.device | str, *, padding: bool = False, batch_tokens: int = BATCH_TOKENS,
                         max_padding: float = MAX_PADDING) -> LayerInputs:
    """Run each sample through the model with every decoder layer replaced by a recording identity.

    The stand-ins return their input unchanged, so reaching the last layer costs only the embedding
    and the model's mask / rotary set-up; the last one stops the forward pass (no LM head).
    ``padding``: samples of similar length run as right-padded batches (:func:`padded_groups`; the
    model builds their masks from the ``attention_mask``), and a sample that comes with padding of
    its own keeps its mask as the unit's token mask. ``batch_tokens`` ≤ 0: every sample alone.
    """
    hidden_states: list[torch.Tensor] = []
    calls: list[list[dict]] = []
    keys: list[int | None] = []
    masks: list[torch.Tensor | None] = []
    members: list[list[int]] = []
    current: list[dict] = []
    memo: dict[int, Any] = {}
    shape: list[torch.Size] = []
    by_length: dict[int, list[dict]] = {}  # the first unpadded one-row sample's arguments per length
    last = len(layers) - 1

    def stand_in(index: int, parameters: list[str]):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if len(args) > 1:  # bind positional extras to their names, so every layer call is (hidden, **kwargs)
                if len(args) - 1 > len(parameters):
                    raise UnsupportedModelError(f"decoder layer {index} of {type(model).__name__} takes "
                                                "variable positional arguments; the engine needs named ones")
                kwargs.update(zip(parameters, args[1:]))
            kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}  # the stand-ins record no cache
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
            return (hidden, None, None) if tuple_out else hidden
        return forward

    tuple_out = _indexes_layer_output(model, layers)

    saved = [layer.__dict__.get("forward") for layer in layers]  # e.g. an offloading hook's wrapper
    for index, layer in enumerate(layers):
        parameters = [p.name for p in list(inspect.signature(layer.forward).parameters.values())[1:]
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        layer.forward = stand_in(index, parameters)  # instance attribute: nn.Module.__call__ finds it first
    model_device = _first_device(model)
    try:
        for ids, mask, samples in _padded_batches(calibration, padding, batch_tokens, max_padding, _pad_id(model)):
            current, memo = [], {}
            ids = ids.to(model_device)
            try:
                model(input_ids=ids, attention_mask=(torch.ones_like(ids) if mask is None else mask.to(model_device)),
                      use_cache=False)
            except _Captured:
                pass
            if len(current) != len(layers):
                raise UnsupportedModelError(
                    f"{type(model).__name__}'s forward pass reached {len(current)} of its {len(layers)} decoder "
                    "layers; the engine needs every layer called once per forward pass")
            unpadded = mask is None or bool(mask.all())
            key = (int(ids.shape[1]) if unpadded and ids.shape[0] == 1 and _batch_free(current, int(ids.shape[0]))
                   else None)
            if key is not None:  # e.g. rotary tables: one copy for all samples of a length, not one each
                first = by_length.setdefault(key, current)
                if first is not current and _same_arguments(first, current, {}):
                    current = first
            calls.append(current)
            keys.append(key if batch_tokens > 0 else None)
            masks.append(None if unpadded or not padding else mask.to(device).bool())
            members.append(samples)
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    inputs = LayerInputs(hidden_states, calls, keys, masks, members)
    inputs.batch_tokens = batch_tokens
    return inputs


def _batch_free(calls: list[dict], batch: int) -> bool:
    """Whether every captured layer argument broadcasts over a batch of samples (rotary tables [1, T, D],
    masks [1, 1, T, T], positions [T]), so equal-length samples can share them in one batched call. BLOOM's
    ALiBi bias is [batch x heads, 1, T]: per sample, not shareable."""
    found = []
    _map_tensors(calls, lambda t: found.append(t) or t, {})
    return all(t.dim() < 2 or t.shape[0] == batch for t in found)


def _indexes_layer_output(model: torch.nn.Module, layers: Sequence[torch.nn.Module]) -> bool:
    """Whether the model's layer loop takes the hidden states out of a tuple (``hidden_states =
    outputs[0]``: Falcon, GPT-J, BLOOM, MPT, whose layers return (hidden, attention weights / cache))
    rather than using the layer's return value as it is (transformers 5's decoder layers), so that the
    capture's stand-in layers return the same shape of thing."""
    owner = next((m for m in model.modules() if any(child is layers for child in m.children())), None)
    if owner is None:
        return False
    try:
        source = inspect.getsource(type(owner).forward)
    except (OSError, TypeError):
        return False
    return re.search(r"hidden_states\s*=\s*\w+\[0\]", source) is not None


def _same_arguments(a: Any, b: Any, memo: dict[int, bool]) -> bool:
    """Whether two samples' captured layer arguments are equal: same structure, equal tensors (dtype,
    shape, device and values), equal other values; each of ``b``'s objects compared once (``memo``)."""
    if id(b) in memo:
        return memo[id(b)]
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and a.layout == b.layout and torch.equal(a, b))
    elif isinstance(a, (tuple, list)) and type(a) is type(b):
        same = len(a) == len(b) and all(_same_arguments(x, y, memo) for x, y in zip(a, b))
    elif isinstance(a, dict) and type(a) is type(b):
        same = a.keys() == b.keys() and all(_same_arguments(a[k], b[k], memo) for k in a)
    else:
        try:
            same = type(a) is type(b) and bool(a == b)
        except Exception:  # objects without a plain equality (caches, masks of other types): keep both
            same = False
    memo[id(b)] = same
    return same


def _first_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device
