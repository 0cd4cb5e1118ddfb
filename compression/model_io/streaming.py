"""Models larger than memory: decoder layers read lazily from the safetensors shards.

:func:`load_streamed` builds the model's skeleton with its parameters on the meta device
(``accelerate.init_empty_weights(include_buffers=False)``: no weight memory, rotary tables and other
computed buffers real), then materializes only what lies outside the decoder layers (embeddings,
final norm, LM head; tied weights re-tied). Each decoder layer's tensors are read from the shards
(:func:`read_safetensors`: each tensor from its byte range, never the whole state dict nor a map of the file) when
the layer is needed and put back on the meta device afterwards:

* compression (:func:`compression.sequential.compress_model` with ``layer_io=``): ``load`` before
  a layer is processed, ``done`` after it: its tensors go through the export's own per-module
  logic (:func:`compression.model_io.export.checkpoint_tensors`) into a
  :class:`compression.model_io.export.ShardWriter` (a shard is saved as soon as it is full), its
  codes are dropped from the report, and the layer is released;
* evaluation (:meth:`StreamedModel.lazy_layers`): a forward pre-hook loads each layer, a forward
  hook releases it, so lm-eval and the perplexity loop see an ordinary model object.

:meth:`StreamedModel.finish_export` writes the tensors outside the layers, renames the shards
(``model-0000k-of-0000N``), writes the index and then config.json, tokenizer, recipe exactly as
:func:`compression.model_io.export.export_checkpoint` does. Peak host memory is the tensors outside
the layers, two copies of one layer (the stored dtype and the compute dtype while converting), the
calibration activations, one layer's solver workspace and one shard: it does not grow with depth.

:func:`plan_memory` decides, before any work, whether a job streams (see its docstring) and
refuses a job that cannot fit (:class:`MemoryPlanError`, naming the setting to change).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from compression.errors import RecipeError

log = logging.getLogger(__name__)

STREAMING_ENV = "COMPRESSOR_STREAMING"  # auto (default) | always | never
HOST_MEMORY_ENV = "COMPRESSOR_HOST_MEMORY_BYTES"  # the worker's host-memory budget (default: what is available)
DEVICE_MEMORY_ENV = "COMPRESSOR_DEVICE_MEMORY_BYTES"  # the compute device's budget (default: free CUDA memory)
MIN_STREAM_SHARD_BYTES = 64 * 2 ** 20


class MemoryPlanError(RecipeError):
    """The job cannot fit the worker's memory plan; ``field`` names the setting to change."""


# -- reading the source checkpoint ----------------------------------------------------------------
MAX_HEADER_BYTES = 100 * 2 ** 20  # safetensors caps its JSON header at 100 MB


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _raw_header(path: str | os.PathLike) -> tuple[int, dict[str, Any]]:
    """(offset of the data, {name: {dtype, shape, data_offsets}}) of one safetensors file: the 8-byte length
    and the JSON that open it, read directly -- ``safe_open`` memory-maps the whole file, which a host refuses
    for a file larger than its memory (a 93 GB single-file checkpoint failed job submission that way)."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= MAX_HEADER_BYTES:
                raise ValueError(f"header length {size}")
            header = json.loads(handle.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a mapping")
        header.pop("__metadata__", None)
        return 8 + size, header
    except (OSError, ValueError) as exc:
        raise MemoryPlanError("model", f"{Path(path).name} is not a readable safetensors file ({exc})") from exc


def safetensors_header(path: str | os.PathLike) -> dict[str, tuple[list[int], str]]:
    """name → (shape, safetensors dtype) of one safetensors file (no tensor data read)."""
    try:
        return {str(name): ([int(d) for d in info["shape"]], str(info["dtype"]))
                for name, info in _raw_header(path)[1].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MemoryPlanError("model", f"{Path(path).name} is not a readable safetensors file ({exc})") from exc


def read_safetensors(path: str | os.PathLike, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of one safetensors file, each read from its byte range with ordinary file reads (no
    memory map of the whole file, see :func:`_raw_header`), in the order they lie in the file."""
    start, header = _raw_header(path)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as handle:
        for name in sorted(names, key=lambda n: header[n]["data_offsets"][0]):
            info = header[name]
            begin, end = (int(x) for x in info["data_offsets"])
            dtype = SAFETENSORS_DTYPES.get(str(info["dtype"]))
            if dtype is None:
                raise MemoryPlanError("model", f"{name} has dtype {info['dtype']}, which streaming cannot read")
            handle.seek(start + begin)
            data = bytearray(end - begin)
            if handle.readinto(data) != end - begin:
                raise MemoryPlanError("model", f"{Path(path).name} ends inside tensor {name}")
            shape = [int(d) for d in info["shape"]]
            out[name] = (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(shape)
    return out


class ShardReader:
    """Tensor name → shard file of a safetensors model directory (index or single file); reads the
    tensors asked for from their byte ranges (:func:`read_safetensors`), each file closed after a read."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            if not isinstance(weight_map, dict):
                raise MemoryPlanError("model", "the safetensors index has no weight_map")
            self.files = {str(k): _shard_name(v) for k, v in weight_map.items()}
        else:
            self.files = {}
            for name in self.single_files():
                self.files.update({tensor: name for tensor in self.file_header(name)})
        self._shapes: dict[str, tuple[list[int], str]] | None = None

    def single_files(self) -> list[str]:
        """The weight files of a checkpoint without an index."""
        return sorted(p.name for p in self.directory.glob("*.safetensors"))

    def path(self, filename: str) -> Path:
        """The local file of shard ``filename`` (a Hub reader downloads it here, the first time)."""
        return self.directory / filename

    def file_header(self, filename: str) -> dict[str, tuple[list[int], str]]:
        """name → (shape, safetensors dtype) of one shard, from its header (no tensor data read)."""
        return safetensors_header(self.directory / filename)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def headers(self) -> dict[str, tuple[list[int], str]]:
        """name → (shape, safetensors dtype) from the files' headers (no tensor data read)."""
        if self._shapes is None:
            shapes: dict[str, tuple[list[int], str]] = {}
            for filename in sorted(set(self.files.values())):
                shapes.update(self.file_header(filename))
            self._shapes = shapes
        return self._shapes

    def read(self, names: list[str], dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors, floating-point ones cast to ``dtype``, on ``device``."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for filename, wanted in by_file.items():
            for name, t in read_safetensors(self.path(filename), wanted).items():
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                out[name] = t.to(device)
        return out


class RenamedReader:
    """A :class:`ShardReader` seen through the model's module names, for checkpoints whose tensors
    transformers renames on load (a vision-language model's ``language_model.model.layers.N...`` on disk
    is ``model.language_model.layers.N...`` in the model): names are translated with
    :class:`~compression.model_io.moe.CheckpointNames` (transformers' own conversion mapping)."""

    def __init__(self, reader: ShardReader, names: Any):
        self.reader, self.names = reader, names
        self._headers: dict[str, tuple[list[int], str]] | None = None

    def __contains__(self, name: str) -> bool:
        return self.names.checkpoint(name) in self.reader

    def headers(self) -> dict[str, tuple[list[int], str]]:
        if self._headers is None:
            self._headers = {self.names.module(k): v for k, v in self.reader.headers().items()}
        return self._headers

    def read(self, names: list[str], dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        keys = {n: self.names.checkpoint(n) for n in names}
        found = self.reader.read(list(keys.values()), dtype, device)
        return {n: found[k] for n, k in keys.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["reader"], name)


class FusedExpertsReader:
    """A reader seen through a model whose fused MoE experts were split (``moe.unfuse_experts``), for
    checkpoints that store the experts fused as they are in memory (Llama 4, gpt-oss): each per-expert tensor
    (``experts.N.gate_proj.weight`` ...) is cut from the layer's fused ``gate_up_proj`` / ``down_proj`` (and
    their ``_bias``) exactly as ``PerExpertLinears`` cuts the in-memory ones; each fused tensor is read once per call."""

    def __init__(self, reader: Any, model: torch.nn.Module):
        from compression.model_io.moe import per_expert_modules

        self.reader = reader
        self.parts: dict[str, tuple[str, Any, int, int | None, bool]] = {}  # name -> fused, module, expert, half, bias
        base = reader.headers()
        for path, experts in per_expert_modules(model):
            if f"{path}.gate_up_proj" not in base or f"{path}.down_proj" not in base:
                continue
            for e in range(experts.num_experts):
                gate, up, down = experts.expert(e).names
                for attr, fused, half in ((gate, "gate_up_proj", 0), (up, "gate_up_proj", 1), (down, "down_proj", None)):
                    self.parts[f"{path}.{e}.{attr}.weight"] = (f"{path}.{fused}", experts, e, half, False)
                    if f"{path}.{fused}_bias" in base:
                        self.parts[f"{path}.{e}.{attr}.bias"] = (f"{path}.{fused}_bias", experts, e, half, True)
        self._headers: dict[str, tuple[list[int], str]] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.parts or name in self.reader

    def headers(self) -> dict[str, tuple[list[int], str]]:
        if self._headers is None:
            base = self.reader.headers()
            fused = {part[0] for part in self.parts.values()}
            headers = {k: v for k, v in base.items() if k not in fused}
            for name, (source, experts, _, half, bias) in self.parts.items():
                shape, dtype = base[source]
                headers[name] = (list(self._cut(torch.empty(shape, device="meta"), experts, 0, half, bias).shape), dtype)
            self._headers = headers
        return self._headers

    @staticmethod
    def _cut(fused: torch.Tensor, experts: Any, e: int, half: int | None, bias: bool) -> torch.Tensor:
        t = fused[e]
        if not bias and experts.fused_transposed:  # [H, 2I] / [I, H] on disk, [out, in] as a Linear
            t = t.transpose(0, 1)
        if half is not None:
            inter = t.shape[0] // 2
            t = (t[:inter] if half == 0 else t[inter:]) if experts.concatenated else t[half::2]
        return t

    def read(self, names: list[str], dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        plain = [n for n in names if n not in self.parts]
        out = self.reader.read(plain, dtype, device) if plain else {}
        by_source: dict[str, list[str]] = {}
        for name in names:
            if name in self.parts:
                by_source.setdefault(self.parts[name][0], []).append(name)
        for source, cut in sorted(by_source.items()):
            fused = self.reader.read([source], dtype, device)[source]
            for name in cut:
                _, experts, e, half, bias = self.parts[name]
                out[name] = self._cut(fused, experts, e, half, bias).clone(memory_format=torch.contiguous_format)
            del fused
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["reader"], name)


def _shard_name(value: Any) -> str:
    name = str(value)
    if not name.endswith(".safetensors") or "/" in name or "\\" in name or name.startswith("."):
        raise MemoryPlanError("model", f"the safetensors index names {name!r}, not a .safetensors file at the "
                              "checkpoint's top level")
    return name


class HubShardReader(ShardReader):
    """The shards of a Hub model, each downloaded (``huggingface_hub.hf_hub_download``, into the Hugging
    Face cache, from the commit of the snapshot folder ``directory`` that holds the config and the index,
    with the token huggingface_hub finds as for every other download) the first time a tensor in it is
    read: a streamed job starts on the first layers while the later shards are still on the Hub, and a
    job refused by its memory plan downloads none. Headers come from a shard already in the cache, else
    from the shard's header bytes alone (``huggingface_hub.parse_safetensors_file_metadata``). Nothing
    is deleted from the cache (it is the user's). ``fetched``: the shards downloaded, in order."""

    def __init__(self, directory: str | os.PathLike, repo_id: str, revision: str | None = None):
        self.repo_id = repo_id
        self.revision = revision or Path(directory).name  # a snapshot folder is named by its commit
        self.fetched: list[str] = []
        super().__init__(directory)

    def single_files(self) -> list[str]:
        return ["model.safetensors"]

    def path(self, filename: str) -> Path:
        local = self.directory / filename
        if local.is_file():
            return local
        from huggingface_hub import hf_hub_download

        from compression.model_io.loading import ModelSourceError, _inside

        log.info("downloading %s of %s@%s", filename, self.repo_id, self.revision)
        try:
            found = Path(hf_hub_download(self.repo_id, filename, revision=self.revision))
        except Exception as exc:  # noqa: BLE001 - no connection, offline mode, gated repo, missing file
            raise ModelSourceError(f"could not download {filename} of {self.repo_id} from the Hugging Face "
                                   f"Hub: {exc}") from exc
        repo_cache = self.directory.parents[1].resolve()  # snapshot files link into the repository's blobs only
        if not _inside(found.resolve(), [repo_cache]):
            raise ModelSourceError(f"{filename} of {self.repo_id} resolves to {found.resolve()}, outside the "
                                   "repository's cache")
        self.fetched.append(filename)
        return found

    def file_header(self, filename: str) -> dict[str, tuple[list[int], str]]:
        if (self.directory / filename).is_file():
            return super().file_header(filename)
        from huggingface_hub import parse_safetensors_file_metadata

        try:
            meta = parse_safetensors_file_metadata(self.repo_id, filename, revision=self.revision)
        except Exception as exc:  # noqa: BLE001 - as for a download
            raise MemoryPlanError("model", f"could not read the header of {filename} of {self.repo_id} from "
                                  f"the Hugging Face Hub: {exc}") from exc
        return {name: (list(info.shape), str(info.dtype)) for name, info in meta.tensors.items()}


_ST_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def _assign(root: torch.nn.Module, path: str, tensor: torch.Tensor) -> None:
    owner_path, _, attr = path.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


# -- the streamed model ---------------------------------------------------------------------------
class StreamedModel:
    """A model whose decoder layers stay on disk until used (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, reader: ShardReader, prefix: str, layers: torch.nn.ModuleList,
                 dtype: torch.dtype):
        self.model, self.reader, self.prefix, self.layers, self.dtype = model, reader, prefix, layers, dtype
        self.writer = None
        self.storage_dtype: torch.dtype | None = None
        self.counts = [0, 0]  # zeros, elements of the parameters written (sparsity_config)
        self.loads = 0  # layer loads so far (tests, logs)

    def layer_names(self, index: int) -> list[str]:
        return list(self.layers[index].state_dict(keep_vars=True))

    def load(self, index: int, layer: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        """Read decoder layer ``index`` from the shards onto ``device`` (compute dtype)."""
        prefix = f"{self.prefix}.{index}"
        local = self.layer_names(index)
        tensors = self.reader.read([f"{prefix}.{n}" for n in local], self.dtype, device)
        for name in local:
            _assign(layer, name, tensors.pop(f"{prefix}.{name}"))
        self.loads += 1

    def release(self, index: int, layer: torch.nn.Module) -> None:
        """Put decoder layer ``index`` back on the meta device (its memory is freed)."""
        for name, t in layer.state_dict(keep_vars=True).items():
            _assign(layer, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        release_heap()

    # compression: compress_model(layer_io=self)
    def done(self, index: int, layer: torch.nn.Module, report: Any) -> None:
        """Layer ``index`` is compressed: write its checkpoint tensors, drop its codes, release it."""
        if self.writer is not None:
            from compression.model_io.export import checkpoint_tensors, zero_counts

            prefix = f"{self.prefix}.{index}"
            items = [(f"{prefix}.{n}", t) for n, t in layer.state_dict().items()]
            self.writer.add(checkpoint_tensors(items, self.model, report, self.storage_dtype, model_dtype=self.dtype))
            zeros, total = zero_counts(layer.parameters())
            self.counts[0] += zeros
            self.counts[1] += total
            for record in report.modules.values():
                if record.name.startswith(prefix + ".") and record.codes is not None:
                    record.codes = record.scale = record.zero_point = record.g_idx = record.global_scale = None
                    record.written = True
        self.release(index, layer)

    def begin_export(self, out_dir: str | os.PathLike, storage_dtype: torch.dtype,
                     max_shard_bytes: int | None = None) -> None:
        """Layers finished from now on are written into ``out_dir`` as they finish."""
        from compression.model_io.export import ShardWriter

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.storage_dtype = storage_dtype
        self.writer = ShardWriter(out, max_shard_bytes or self.shard_bytes(storage_dtype))

    def shard_bytes(self, storage_dtype: torch.dtype) -> int:
        """Shard size of a streamed export: about one dense layer in the storage dtype (at least
        64 MiB, at most the usual 2 GiB), so the shard being filled never outgrows one layer."""
        from compression.model_io.export import DEFAULT_SHARD_BYTES

        item = torch.empty((), dtype=storage_dtype).element_size()
        headers = self.reader.headers()
        layer = max((sum(_numel(headers[f"{self.prefix}.{i}.{n}"][0]) for n in self.layer_names(i))
                     for i in range(len(self.layers))), default=0)
        return int(min(DEFAULT_SHARD_BYTES, max(MIN_STREAM_SHARD_BYTES, layer * item)))

    def finish_export(self, tokenizer: Any, recipe: Any, report: Any) -> dict:
        """The tensors outside the decoder layers, the index, then config/tokenizer/recipe files."""
        from compression.model_io.export import checkpoint_tensors, write_checkpoint_files, zero_counts

        inside = self.prefix + "."
        items = [(n, t) for n, t in self.model.state_dict().items() if not n.startswith(inside)]
        self.writer.add(checkpoint_tensors(items, self.model, report, self.storage_dtype, model_dtype=self.dtype))
        zeros, total = zero_counts(p for n, p in self.model.named_parameters() if not n.startswith(inside))
        files = self.writer.finish()
        counts = (self.counts[0] + zeros, self.counts[1] + total)
        return write_checkpoint_files(self.model, tokenizer, recipe, report, self.writer.out, self.storage_dtype,
                                      files, parameter_counts=counts)

    # evaluation
    @contextmanager
    def lazy_layers(self, device: torch.device | str = "cpu") -> Iterator[torch.nn.Module]:
        """The model, usable as a whole: each decoder layer is read from disk (onto ``device``) right
        before its forward pass and released right after; the rest of the model moves to ``device``."""
        handles = []
        for index, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(
                lambda module, args, kwargs, i=index: self.load(i, module, device), with_kwargs=True))
            handles.append(layer.register_forward_hook(
                lambda module, args, kwargs, output, i=index: self.release(i, module), with_kwargs=True))
        moved = torch.device(device).type != "cpu"
        if moved:
            self._outside_layers(device)
        try:
            yield self.model
        finally:
            for handle in handles:
                handle.remove()
            for index, layer in enumerate(self.layers):  # a forward pass that raised may leave one loaded
                if any(t.device.type != "meta" for t in layer.state_dict().values()):
                    self.release(index, layer)
            if moved:
                self._outside_layers("cpu")

    def _outside_layers(self, device: torch.device | str) -> None:
        parent_name, _, attr = self.prefix.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, attr, torch.nn.ModuleList())
        try:
            self.model.to(device)
        finally:
            setattr(parent, attr, self.layers)


def release_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``). A layer's tensors are under glibc's
    dynamic mmap threshold once a few have been freed, so they land on the heap; without a trim the
    process's resident memory creeps up layer after layer although the tensors are gone."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


@functools.cache
def _glibc(name: str) -> Any:
    """glibc's function ``name`` (through ctypes), or None where the C library is not glibc."""
    try:
        import ctypes

        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None

LARGE_BLOCK_BYTES = 8 * 2 ** 20  # host blocks at least this large get their own mapping (map_large_blocks)


def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> None:
    """Have glibc give every host block of at least ``threshold`` bytes its own mapping, returned to the OS
    when freed (``mallopt(M_MMAP_THRESHOLD)``). By default glibc raises that threshold up to 32 MiB as
    blocks are freed, so a layer's large temporaries (MLP activations of a calibration batch, the float32
    rows of a Hessian update) land on the heap between longer-lived blocks; the heap then grows from layer
    to layer, its freed pages stay resident until the next trim, and the peak climbs with them. Measured
    on the demo model (W4A16 GPTQ, 128 x 512 tokens): ~70 MiB lower peak for ~0.5 s of page faults per layer.
    Left alone when the environment sets glibc's own threshold (``MALLOC_MMAP_THRESHOLD_`` or GLIBC_TUNABLES)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fused_experts_refusal(architecture: str) -> str:
    return (f"{architecture}'s checkpoint has neither per-expert MoE tensors nor 16-bit fused ones (gate_up_proj, "
            "down_proj) to cut them from -- e.g. experts stored quantized (gpt-oss's MXFP4 blocks); this model runs "
            "in memory (streaming: never)")


def fused_on_disk(model: torch.nn.Module, reader: Any) -> str | None:
    """The first per-expert tensor of a model whose fused MoE experts were split (``moe.unfuse_experts``)
    that ``reader`` lacks: the checkpoint stores the experts fused, as they are in memory (Llama 4, gpt-oss;
    :class:`FusedExpertsReader` cuts them), or quantized; None when it holds every expert's tensors one by one
    (Mixtral, Qwen-MoE, DeepSeek, ...)."""
    from compression.model_io.moe import per_expert_modules

    headers = reader.headers()
    for path, experts in per_expert_modules(model):
        for local in experts.state_dict(keep_vars=True):
            if f"{path}.{local}" not in headers:
                return f"{path}.{local}"
    return None


def streaming_refusal(model: torch.nn.Module, reader: ShardReader) -> str | None:
    """Why this model cannot be streamed from these shards (None: it can): MoE experts the checkpoint
    stores in neither form streaming reads (one by one, or 16-bit fused), or tensors whose names or
    shapes in the checkpoint differ from the model's (a family transformers renames on load)."""
    missing = fused_on_disk(model, reader)
    if missing is not None:
        return f"{fused_experts_refusal(type(model).__name__)} (the checkpoint has no {missing!r})"
    headers = reader.headers()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in headers:
            if tied and name.endswith("lm_head.weight"):
                continue
            return f"the checkpoint has no tensor {name!r} (its tensors are named differently from the model's)"
        if list(headers[name][0]) != list(t.shape):
            return f"{name} is {headers[name][0]} in the checkpoint but {list(t.shape)} in the model"
    return None


def stream_refusal(recipe: Any, location: str | os.PathLike, config: Any, *, dtype: torch.dtype,
                   trust_remote_code: bool = False, reader: ShardReader | None = None) -> str | None:
    """Why a job with ``recipe`` cannot stream the model at ``location`` (None: it can); reads the
    shards' headers only."""
    from compression.recipe import finetune_split

    if finetune_split(recipe)[1] is not None:
        return "the recipe's distillation fine-tune trains the whole model at once"
    if any(not m.transforms and m.finetune is None and m.matches("lm_head", "Linear") for m in recipe.modifiers):
        return "the recipe compresses lm_head, which runs after the decoder layers (add it to ignore to stream)"
    try:
        load_streamed(location, dtype=dtype, config=config, check_only=True, trust_remote_code=trust_remote_code,
                      reader=reader)
    except MemoryPlanError as exc:
        return exc.message
    return None


def load_streamed(location: str | os.PathLike, *, dtype: torch.dtype, trust_remote_code: bool = False,
                  config: Any = None, check_only: bool = False,
                  reader: ShardReader | None = None) -> StreamedModel | None:
    """The model at ``location`` (a safetensors directory, or with ``reader`` the folder of a Hub
    snapshot's config whose shards ``reader`` fetches) with only the tensors outside its decoder
    layers in memory; raises :class:`MemoryPlanError` (field ``model``) when it cannot be streamed.
    ``check_only``: read the shards' headers only, return None."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from compression.model_io.loading import auto_model_class
    from compression.model_io.walk import decoder_layers

    config = config or AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = auto_model_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    reader = reader or ShardReader(location)
    from compression.model_io.moe import CheckpointNames, unfuse_experts

    names = CheckpointNames.for_model(model)
    # fused MoE experts become the per-expert Linears the engine compresses anyway, under the checkpoint's
    # per-expert names: each layer's experts are read one by one (or cut from its fused tensors, below)
    unfuse_experts(model, names)
    if names.to_checkpoint_renamings:  # tensors transformers renames on load: read them by their stored names
        reader = RenamedReader(reader, names)
    if fused_on_disk(model, reader) is not None:  # Llama 4, gpt-oss: the checkpoint stores the experts fused
        reader = FusedExpertsReader(reader, model)
    reason = streaming_refusal(model, reader)
    if reason:
        raise MemoryPlanError("model", f"cannot stream this model layer by layer: {reason}")
    if check_only:
        return None
    prefix, layers = decoder_layers(model)
    outside = [n for n in model.state_dict(keep_vars=True) if not n.startswith(prefix + ".") and n in reader]
    for name, tensor in reader.read(outside, dtype).items():
        _assign(model, name, tensor)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in model.state_dict(keep_vars=True).items()
            if not n.startswith(prefix + ".") and t.device.type == "meta"]
    if left:
        raise MemoryPlanError("model", f"cannot stream this model: {', '.join(left[:3])} not found in the checkpoint")
    return StreamedModel(model, reader, prefix, layers, dtype)


# -- the memory plan ------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """How a job will use memory, decided before any work: ``mode`` "in-memory" or "streaming"."""

    mode: str
    reason: str
    host_budget_bytes: int | None  # None: not known to the planner (job submission)
    in_memory_bytes: int
    streaming_bytes: int
    device_budget_bytes: int | None = None
    device_bytes: int | None = None
    offload_activations: bool = False  # calibration activations kept in host memory, one batch on the device

    def to_dict(self) -> dict:
        return asdict(self)


def host_budget() -> int:
    """$COMPRESSOR_HOST_MEMORY_BYTES, else what this process holds plus what the host has available."""
    value = os.environ.get(HOST_MEMORY_ENV)
    if value:
        return _positive_int(value, HOST_MEMORY_ENV)
    try:
        import psutil

        return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)
    except ImportError:  # psutil is a dependency; /proc says the same on Linux
        return _proc_kb("/proc/meminfo", "MemAvailable:") + _proc_kb("/proc/self/status", "VmRSS:")


def _proc_kb(path: str, key: str) -> int:
    with open(path, encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{path} has no {key}; set {HOST_MEMORY_ENV}")


def device_budget(device: str) -> int | None:
    """$COMPRESSOR_DEVICE_MEMORY_BYTES, else the free memory of a CUDA device; None for the CPU
    (its memory is the host's, planned with the host budget)."""
    value = os.environ.get(DEVICE_MEMORY_ENV)
    if value:
        return _positive_int(value, DEVICE_MEMORY_ENV)
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return None


def _positive_int(value: str, name: str) -> int:
    try:
        number = int(float(value))
    except ValueError:
        number = 0
    if number <= 0:
        raise MemoryPlanError(name, f"must be a positive number of bytes, got {value!r}")
    return number


def streaming_setting(spec: dict) -> str:
    value = str(spec.get("streaming") or os.environ.get(STREAMING_ENV) or "auto").lower()
    if value not in ("auto", "always", "never"):
        raise MemoryPlanError(STREAMING_ENV, f"must be auto, always or never, got {value!r}")
    return value


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def configured_budgets(spec: dict | None = None) -> tuple[int | None, int | None]:
    """(host, device) budgets set explicitly: the spec's ``host_memory_bytes`` / ``device_memory_bytes``
    (the web app's settings of the same names, jobs.tasks.job_spec), else $COMPRESSOR_HOST_MEMORY_BYTES /
    $COMPRESSOR_DEVICE_MEMORY_BYTES; None where unset (the worker then measures its free memory)."""
    spec = spec or {}
    host = spec.get("host_memory_bytes") or os.environ.get(HOST_MEMORY_ENV)
    device = spec.get("device_memory_bytes") or os.environ.get(DEVICE_MEMORY_ENV)
    return (_positive_int(str(host), HOST_MEMORY_ENV) if host else None,
            _positive_int(str(device), DEVICE_MEMORY_ENV) if device else None)


def plan_memory(report: Any, *, device: str, setting: str = "auto", can_stream: str | None = None,
                host_bytes: int | None = None, device_bytes: int | None = None, samples: int = 0,
                seqlen: int = 0, offload_ok: bool = True, measure: bool = True) -> MemoryPlan:
    """Choose in-memory or streaming for a job whose pre-flight ``report`` is given, or refuse it.

    ``can_stream``: None when the source can be streamed, else why not. ``setting``: ``never``
    keeps today's in-memory path, ``always`` streams (refused when the source cannot be), ``auto``
    streams only when the in-memory estimate exceeds the host budget and the streaming one fits
    (streaming re-reads every layer from disk for each evaluation pass, so it is not the default).
    Calibration activations that do not fit a GPU while the rest of its layer does are kept in host
    memory (``offload_activations``; each batch visits the device for its layer call) when the recipe
    allows it (``offload_ok``, :func:`compression.sequential.offloadable`).
    Refusals (:class:`MemoryPlanError`): calibration activations that do not fit the device or the
    host (field ``calibration.samples``, with the largest count that fits), a model that fits
    neither way (field ``COMPRESSOR_HOST_MEMORY_BYTES``).
    ``measure``: a budget not given is measured (the worker); without it (job submission, another
    process than the worker's) a budget not given is not checked: that part is left to the worker."""
    host = host_bytes if host_bytes is not None else host_budget() if measure else None
    dev = device_bytes if device_bytes is not None else device_budget(device) if measure else None
    in_memory = int(report.peak_host_mb * 2 ** 20)
    streaming = int(report.peak_host_streaming_mb * 2 ** 20)
    activations = int(report.activation_mb * 2 ** 20)
    plan = MemoryPlan("in-memory", "", host, in_memory, streaming, dev, int(report.peak_device_mb * 2 ** 20))
    if host is None:  # not checked here (see ``measure``)
        host = sys.maxsize
    device_activations = int(1.5 * activations)  # the device holds 1.5x (workspace) those entering and leaving a layer
    if dev is not None and not device.startswith("cpu") and plan.device_bytes > dev:
        if offload_ok and device_activations and plan.device_bytes - device_activations <= dev:
            plan.offload_activations = True
        else:
            _refuse_calibration(plan.device_bytes, device_activations, dev, samples, seqlen, f"the {device} device")
            raise MemoryPlanError(DEVICE_MEMORY_ENV, f"one decoder layer with its solver workspace needs about "
                                  f"{_mb(plan.device_bytes)} on {device}, more than its {_mb(dev)} ({DEVICE_MEMORY_ENV}); "
                                  "run the job on a device with more memory or choose a smaller model")
    if setting == "always" and can_stream:
        raise MemoryPlanError(STREAMING_ENV, f"{STREAMING_ENV}=always but {can_stream}")
    stream = setting == "always" or (setting == "auto" and in_memory > host and not can_stream)
    host_activations = activations if device.startswith("cpu") or plan.offload_activations else 0
    need = (streaming if stream else in_memory) + (activations if plan.offload_activations else 0)
    if need > host:
        _refuse_calibration(need, host_activations, host, samples, seqlen, "host memory")
        how = (f"streamed layer by layer it still needs {_mb(streaming)}" if not can_stream else
               f"it cannot be streamed ({can_stream})")
        raise MemoryPlanError(HOST_MEMORY_ENV, f"the job needs about {_mb(in_memory)} of host memory in memory and "
                              f"{how}, but the worker's budget is {_mb(host)}; run it on a worker with more "
                              f"memory (raise {HOST_MEMORY_ENV}) or choose a smaller model")
    plan.mode = "streaming" if stream else "in-memory"
    plan.reason = ("streaming forced by the setting" if setting == "always" else
                   "the host budget is the worker's to measure" if plan.host_budget_bytes is None else
                   f"the in-memory estimate {_mb(in_memory)} exceeds the budget {_mb(host)}" if stream else
                   f"the in-memory estimate {_mb(in_memory)} fits the budget {_mb(host)}")
    return plan


def _refuse_calibration(need: int, activations: int, budget: int, samples: int, seqlen: int, where: str) -> None:
    """Refuse naming ``calibration.samples`` when the activations are what does not fit."""
    if not activations or not samples or need - activations > budget:
        return
    per_sample = activations / samples
    fits = max(0, int((budget - (need - activations)) // per_sample))
    raise MemoryPlanError("calibration.samples", f"{samples} samples x {seqlen} tokens need about {_mb(activations)} "
                          f"of activations, more than {where} can hold ({_mb(budget)} in all); use at most "
                          f"{fits} samples or shorter ones (calibration.seqlen)")
