"""Write a compressed-tensors checkpoint (reference doc §2.1–2.5, 2.8) from a compressed model.

Per quantized Linear ``<p>``: INT4/INT8 weight-only → ``pack-quantized`` (``weight_packed`` int32,
``weight_scale``, ``weight_shape``); INT8 W8A8 → ``int-quantized`` (``weight`` int8 +
``weight_scale``); FP8 → ``float-quantized`` (``weight`` float8_e4m3fn + ``weight_scale`` [+
``input_scale`` for static activations]). Unquantized tensors and scales are stored in the source
checkpoint's dtype (``export_checkpoint(dtype=...)``, e.g. bfloat16 even when the job ran in float32 on
a CPU). 2:4 weights stay dense with +0.0 zeros and are described by a compressed-tensors
``sparsity_config`` (format ``dense``, ``sparsity_structure`` "2:4", ``global_sparsity``, targets,
ignore), for a 2:4-only model inside a ``quantization_config`` of format ``dense`` with no config
groups. config.json names the model class in ``architectures`` and carries no server paths.

Tensor names are the family's checkpoint names (:class:`compression.model_io.moe.CheckpointNames`): MoE
experts are written one Linear per expert (``model.layers.0.block_sparse_moe.experts.3.w1`` for
Mixtral, ``model.layers.0.mlp.experts.3.gate_proj`` for the Qwen-MoE/OLMoE/DeepSeek family), as
the family's own checkpoints and vLLM's loaders name them, and transformers fuses them on load.
Routers stay 16-bit and are listed in ``ignore``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from compression.model_io.moe import CheckpointNames
from compression.algorithms.quant import QuantArgs, mx_exponents, pack_fp4
from compression.recipe import Recipe, checkpoint_format, class_names, matches_any  # noqa: F401 (checkpoint_format: re-exported)
from compression.sequential import CompressionReport, ModuleRecord
from kernels.packing import pack_int


# Artifact permissions, chosen for a web server and a worker running as different users that share
# one group (docker-compose: users compressor-web and compressor-worker, group compressor): the worker
# owns and may delete what it wrote, the group (the web server) may read and download it, nobody else
# sees it. Set explicitly because safetensors writes 0600 files and umasks differ between hosts.
ARTIFACT_FILE_MODE = 0o640
ARTIFACT_DIR_MODE = 0o750


def apply_artifact_modes(root: str | os.PathLike) -> None:
    """chmod every directory under ``root`` (itself included) to ARTIFACT_DIR_MODE, keeping a set-group-id
    bit it inherited, and every file to ARTIFACT_FILE_MODE. Symlinks are left alone (never followed)."""
    root = Path(root)
    for folder, dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                path.chmod(ARTIFACT_FILE_MODE)
        keep = os.stat(folder).st_mode & 0o2000  # S_ISGID: new files keep the shared group
        os.chmod(folder, ARTIFACT_DIR_MODE | keep)

log = logging.getLogger(__name__)

EXPORTER_VERSION = "compressor-0.1"
DEFAULT_SHARD_BYTES = 2 * 2 ** 30


def quantization_config(model: torch.nn.Module, recipe: Recipe, report: CompressionReport) -> dict | None:
    """The ``quantization_config`` block, or None when nothing was quantized (e.g. 2:4 alone)."""
    groups: dict[str, dict] = {}
    formats: list[str] = []
    ignore: list[str] = []
    for m in recipe.modifiers:
        if not m.quantizes or m.superseded_by is not None:  # a QM whose scheme a later GPTQ solves
            continue
        for g in m.config_groups.values():
            if g.weights is None:  # an UNQUANTIZED group: its modules stay 16-bit and are listed in ignore
                continue
            fmt = checkpoint_format(g.weights, g.input_activations)
            formats.append(fmt)
            groups[f"group_{len(groups)}"] = {
                "targets": list(g.targets), "weights": g.weights.checkpoint_dict(),
                "input_activations": g.input_activations.checkpoint_dict() if g.input_activations else None,
                "output_activations": None, "format": fmt}
        ignore.extend(x for x in m.ignore if x not in ignore)
    if not groups and recipe.kv_cache is None:
        return None
    quantized = {name for name, r in report.modules.items() if r.codes is not None or r.written}
    names = CheckpointNames.for_model(model)
    for path, module in model.named_modules():
        # Every Linear we did not quantize must be ignored explicitly, or loaders would expect scales: by its
        # checkpoint name and, where that differs, by its module path in transformers (what its loader and
        # vLLM's match, e.g. a multimodal model's model.vision_tower...)
        name = names.checkpoint(path)
        if isinstance(module, torch.nn.Linear) and name not in quantized:
            for alias in dict.fromkeys((name, path)):
                if not matches_any(ignore, alias, class_names(module)):
                    ignore.append(alias)
    ignore.extend(r for r in report.routers if not matches_any(ignore, r, ""))  # MoE routers stay 16-bit
    top = (formats[0] if len(set(formats)) == 1 else "mixed-precision") if formats else "dense"
    if top != "mixed-precision":
        for g in groups.values():
            g.pop("format")
    return {"quant_method": "compressed-tensors", "format": top, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": _kv_cache_scheme(recipe),
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
            "version": EXPORTER_VERSION}


def sparsity_config(model: torch.nn.Module, recipe: Recipe, report: CompressionReport,
                    parameter_counts: tuple[int, int] | None = None) -> dict | None:
    """compressed-tensors' ``sparsity_config`` for a pruned model stored dense, or None when nothing was pruned.

    ``targets``/``ignore`` are the pruning modifier's, plus every Linear it left dense (so a reader
    applying the 2:4 kernel to the targets never hits a dense matrix); ``global_sparsity`` is the
    fraction of zeros over all of the model's parameters (tied weights once), as llm-compressor reports it
    (``parameter_counts``: (zeros, total) counted by the streaming export while each layer was in memory).
    """
    stats = report.sparsity_stats()
    if not stats:
        return None
    pruned = {name for name, r in report.modules.items() if r.sparsity is not None}
    targets: list[str] = []
    ignore: list[str] = []
    for m in recipe.modifiers:
        if not m.prunes:
            continue
        targets.extend(t for t in m.targets if t not in targets)
        ignore.extend(x for x in m.ignore if x not in ignore)
    if not all(any(matches_any([t], name, "Linear") for name in pruned) for t in targets):
        targets = ["Linear"]  # targets naming containers (decoder layers): every Linear, the others ignored
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in pruned and matches_any(
                targets, name, class_names(module)) and not matches_any(ignore, name, class_names(module)):
            ignore.append(name)
    zeros, total = parameter_counts if parameter_counts is not None else zero_counts(model.parameters())
    structure = stats["sparsity_structure"]
    return {"format": "dense", "sparsity_structure": "unstructured" if structure == "0:0" else structure,
            "global_sparsity": round(zeros / total, 6) if total else 0.0,
            "targets": targets or ["Linear"], "ignore": ignore, "registry_requires_subclass": False}


def zero_counts(parameters) -> tuple[int, int]:
    """(zeros, elements) over ``parameters`` (``model.parameters()`` yields a tied tensor once)."""
    zeros = total = 0
    for p in parameters:
        total += p.numel()
        zeros += int((p == 0).sum())
    return zeros, total


def sparse_only_quantization_config(sparsity: dict) -> dict:
    """The ``quantization_config`` of a model that is pruned but not quantized: no config groups,
    format ``dense``, so vLLM and transformers find the ``sparsity_config`` where they look for it."""
    return {"quant_method": "compressed-tensors", "format": "dense", "quantization_status": "compressed",
            "config_groups": {}, "ignore": list(sparsity.get("ignore") or []), "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": sparsity, "transform_config": {}, "version": EXPORTER_VERSION}


def model_architectures(model: torch.nn.Module) -> list[str]:
    """``architectures`` for config.json: the config's own, else the model's class (a GGUF source has none)."""
    names = [a for a in (getattr(model.config, "architectures", None) or []) if isinstance(a, str) and a]
    return names or [type(model).__name__]


SERVER_ONLY_KEYS = ("_name_or_path", "_commit_hash", "_model_name_or_path", "name_or_path")


def portable_config(config: dict) -> dict:
    """``config`` without what only made sense on this server: private keys such as ``_name_or_path``
    (the directory the model was loaded from) and any top-level string that is an absolute path."""
    out = {}
    for key, value in config.items():
        if key in SERVER_ONLY_KEYS or key.startswith("_"):
            continue
        if isinstance(value, str) and (value.startswith("/") or re.match(r"^[A-Za-z]:\\", value)):
            continue
        out[key] = value
    return out


def checkpoint_config(model: torch.nn.Module, recipe: Recipe, report: CompressionReport,
                      dtype: torch.dtype, compressor_meta: dict,
                      parameter_counts: tuple[int, int] | None = None) -> dict:
    """config.json of the exported checkpoint: the model's config made portable, with its class in
    ``architectures``, the storage dtype, and the compressed-tensors quantization/sparsity configs."""
    config = portable_config(model.config.to_dict())
    config.pop("quantization_config", None)  # e.g. the GGUF source's; never describe the wrong format
    config.pop("torch_dtype", None)
    config["architectures"] = model_architectures(model)
    config["dtype"] = str(dtype).removeprefix("torch.")
    qconfig = quantization_config(model, recipe, report)
    sparsity = sparsity_config(model, recipe, report, parameter_counts)
    if sparsity is not None:
        qconfig = qconfig or sparse_only_quantization_config(sparsity)
        qconfig["sparsity_config"] = sparsity
    if qconfig is not None:
        config["quantization_config"] = qconfig
    config["compressor"] = compressor_meta
    return config
def _kv_cache_scheme(recipe: Recipe) -> dict | None:
    kv = recipe.kv_cache
    return None if kv is None else kv.checkpoint_dict()


def _module_tensors(record: ModuleRecord, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One compressed Linear's tensors, named and typed as compressed-tensors 0.20 writes them."""
    p = record.name
    w = record.weights
    fmt = checkpoint_format(w, record.input_activations)
    if w.is_mx:  # E8M0: the power-of-two scale's biased exponent, uint8 (compressed-tensors' compress_mx_scale)
        scale = mx_exponents(record.scale).contiguous()
    else:
        scale = record.scale.to(getattr(torch, w.scale_dtype) if w.scale_dtype else dtype).contiguous()
    out: dict[str, torch.Tensor] = {}
    if fmt == "mxfp4-pack-quantized":
        out[f"{p}.weight_packed"] = pack_fp4(record.codes)
    elif fmt == "nvfp4-pack-quantized":
        out[f"{p}.weight_packed"] = pack_fp4(record.codes)
        out[f"{p}.weight_global_scale"] = record.global_scale.float().reshape(1).contiguous()
        if record.input_global_scale is not None:
            out[f"{p}.input_global_scale"] = record.input_global_scale.float().reshape(1).contiguous()
    elif fmt == "pack-quantized":
        # held packed since compression (ModuleRecord.codes): the same words pack_int makes here
        out[f"{p}.weight_packed"] = record.packed if record.packed is not None else pack_int(record.codes, w.num_bits)
        out[f"{p}.weight_shape"] = torch.tensor(record.shape, dtype=torch.int64)
    else:
        out[f"{p}.weight"] = record.codes.contiguous()
    out[f"{p}.weight_scale"] = scale
    if record.zero_point is not None:
        zp = record.zero_point.to(torch.int8)
        # pack-quantized packs zero points along the output dimension: [ceil(out / (32 / bits)), groups]
        out[f"{p}.weight_zero_point"] = (pack_int(zp.t().contiguous(), w.num_bits).t().contiguous()
                                         if fmt == "pack-quantized" else zp.contiguous())
    if record.g_idx is not None:
        out[f"{p}.weight_g_idx"] = record.g_idx.to(torch.int32).contiguous()
    if record.input_scale is not None:
        out[f"{p}.input_scale"] = record.input_scale.to(dtype).reshape(1).contiguous()
    if record.input_zero_point is not None:
        out[f"{p}.input_zero_point"] = record.input_zero_point.to(torch.int8).reshape(1).contiguous()
    return out


def checkpoint_state_dict(model: torch.nn.Module, report: CompressionReport,
                          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Dense tensors of the model with every quantized Linear's weight replaced by its compressed form.

    ``dtype`` (default: the model's) is the storage dtype of every tensor held in the model's own
    floating-point dtype and of the scales; quantized codes keep theirs."""
    return checkpoint_tensors(model.state_dict().items(), model, report, dtype)


def _has_negative_zero(tensor: torch.Tensor, block: int = 1 << 20) -> bool:
    """Whether ``tensor`` holds a -0.0, checked a block at a time (the temporaries of a whole-tensor
    check would cost three times a large embedding's size at the export's peak)."""
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), block):
        part = flat[start:start + block]
        if bool(torch.signbit(part).logical_and_(part == 0).any()):
            return True
    return False


def _writable(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` as it goes into a shard: in ``dtype`` (when given), on the host, contiguous, with
    -0.0 canonicalized to +0.0 (2:4 zeros; vLLM PR #13198), and owning its storage (safetensors
    refuses tensors that share memory). A tensor that already is all of that is written as it is,
    not copied: the export holds no second copy of the model."""
    tensor = tensor.detach()
    if dtype is not None:
        tensor = tensor.to(dtype)
    tensor = tensor.cpu().contiguous()
    if tensor.is_floating_point() and _has_negative_zero(tensor):
        tensor = tensor + 0.0
    elif tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()  # a view into a larger tensor (fused parameters, tied slices)
    return tensor


def checkpoint_tensors(items, model: torch.nn.Module, report: CompressionReport, dtype: torch.dtype | None = None,
                       *, model_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """:func:`checkpoint_state_dict` for a part of the model: ``items`` are (module path, tensor) pairs,
    e.g. the whole ``state_dict`` or one decoder layer's (with its prefix), and only the records and
    KV-cache scales of modules among them are written. The streaming export calls it once per layer."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    names = CheckpointNames.for_model(model)
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    model_dtype = model_dtype or next(model.parameters()).dtype
    for name, tensor in items:
        name = names.checkpoint(name)
        ptr = tensor.data_ptr()
        if tied and ptr in seen:  # tied lm_head: safetensors refuses shared storage; HF re-ties on load
            continue
        seen[ptr] = name
        tensors[name] = _writable(tensor, dtype if tensor.is_floating_point() and tensor.dtype == model_dtype else None)
    dtype = dtype or model_dtype
    for record in report.modules.values():
        if record.codes is None or f"{record.name}.weight" not in tensors:
            continue
        tensors.pop(f"{record.name}.weight")
        tensors.update(_module_tensors(record, dtype))
    parents = {n[:i] for n in tensors for i, c in enumerate(n) if c == "."}  # every module path holding a tensor
    for name, scale in getattr(report, "kv_scales", {}).items():  # <attention>.k_scale / .v_scale
        if name.rsplit(".", 1)[0] in parents:
            tensors[name] = (scale.to(dtype).reshape(1) if scale.numel() == 1 else scale.to(dtype)).contiguous()
    return tensors


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, streaming each tensor's bytes from its own memory.

    The file is what ``safetensors.torch.save_file`` writes (8-byte little-endian header length, a
    JSON header of dtype / shape / data offsets, padded with spaces to 8 bytes, then the raw
    little-endian data in header order), but save_file first copies every tensor into a bytes
    object, so writing a shard would hold the shard twice; here at most nothing extra is held.
    Tensors must be contiguous CPU tensors that do not share memory (``checkpoint_tensors`` makes them so)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    # safetensors' own order: widest dtype first, then by name, so every tensor's data stays aligned
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    for name in order:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"cannot write {name}: dtype {t.dtype} has no safetensors name here")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for name in order:
            t = tensors[name]
            if t.numel():
                handle.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


class ShardWriter:
    """Safetensors shards written as tensors arrive: a shard is saved as soon as the next tensor would
    take it past ``max_shard_bytes``, so at most one shard's tensors are held at a time. Shards are
    numbered ``model-0000k-of-0000N.safetensors`` (renamed once N is known) with the index next to them."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.parts: list[tuple[Path, list[str]]] = []
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if self.buffer and self.size + nbytes > self.max_shard_bytes:
                self._flush()
            self.buffer[name] = t
            self.size += nbytes
            self.total += nbytes

    def _flush(self) -> None:
        path = self.out / f".part-{len(self.parts) + 1:05d}.safetensors"
        save_safetensors(self.buffer, path, metadata={"format": "pt"})
        self.parts.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> list[str]:
        if self.buffer or not self.parts:
            self._flush()
        n = len(self.parts)
        weight_map, files = {}, []
        for k, (path, names) in enumerate(self.parts, start=1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / fname)
            files.append(fname)
            weight_map.update({name: fname for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files + ["model.safetensors.index.json"]


def _write_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    writer = ShardWriter(out_dir, max_shard_bytes)
    writer.add(tensors)
    return writer.finish()


def export_checkpoint(model: torch.nn.Module, tokenizer: Any, recipe: Recipe, report: CompressionReport,
                      out_dir: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      dtype: torch.dtype | None = None) -> dict:
    """Write the checkpoint into ``out_dir`` (created). Returns {"files": [...], "bytes": int, "format": str}.

    ``dtype``: storage dtype of the unquantized tensors and scales, normally the source checkpoint's
    (`compression.model_io.loading.source_dtype`); default the model's own."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    files = _write_shards(checkpoint_state_dict(model, report, dtype), out, max_shard_bytes)
    return write_checkpoint_files(model, tokenizer, recipe, report, out, dtype, files)


def write_checkpoint_files(model: torch.nn.Module, tokenizer: Any, recipe: Recipe, report: CompressionReport,
                           out: Path, dtype: torch.dtype, files: list[str], *,
                           parameter_counts: tuple[int, int] | None = None) -> dict:
    """Everything of the checkpoint but its tensors (written already, ``files``): config.json with the
    compressed-tensors configs, compressor.json, recipe.yaml, generation config and tokenizer."""
    compressor_meta = {"version": EXPORTER_VERSION, "preset": recipe.preset, "recipe": recipe.describe(),
                       "sparsity": report.sparsity_stats(), "fallbacks": report.fallbacks}
    config = checkpoint_config(model, recipe, report, dtype, compressor_meta, parameter_counts)
    qconfig = config.get("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "compressor.json").write_text(json.dumps({**compressor_meta, "report": report.summary()}, indent=2) + "\n")
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    files += ["config.json", "compressor.json", "recipe.yaml"]

    generation = getattr(model, "generation_config", None)
    if generation is None:
        from transformers import GenerationConfig

        generation = GenerationConfig.from_model_config(model.config)
    generation.save_pretrained(out)
    files.append("generation_config.json")
    if tokenizer is not None:
        before = set(os.listdir(out))
        tokenizer.save_pretrained(out)
        files += sorted(set(os.listdir(out)) - before)
    total = sum((out / f).stat().st_size for f in files if (out / f).is_file())
    log.info("exported %s (%s, %.1f MB)", out, qconfig["format"] if qconfig else "dense", total / 1e6)
    return {"files": files, "bytes": total, "format": qconfig["format"] if qconfig else "dense"}
