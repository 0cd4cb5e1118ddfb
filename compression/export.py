"""Write a compressed-tensors checkpoint (reference doc §2.1–2.5, 2.8) from a compressed model.

Per quantized Linear ``<p>``: INT4/INT8 weight-only → ``pack-quantized`` (``weight_packed`` int32,
``weight_scale``, ``weight_shape``); INT8 W8A8 → ``int-quantized`` (``weight`` int8 +
``weight_scale``); FP8 → ``float-quantized`` (``weight`` float8_e4m3fn + ``weight_scale`` [+
``input_scale`` for static activations]). Scales are stored in the model dtype. 2:4 weights stay
dense with +0.0 zeros; the sparsity is recorded in our own ``compressor`` metadata.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from compression.quant import QuantArgs, pack_int
from compression.recipe import Recipe, matches_any
from compression.sequential import CompressionReport, ModuleRecord

log = logging.getLogger(__name__)

EXPORTER_VERSION = "compressor-0.1"
DEFAULT_SHARD_BYTES = 2 * 2 ** 30


def checkpoint_format(weights: QuantArgs, acts: QuantArgs | None) -> str:
    """compressed-tensors format name for one scheme (priority order of doc §2.2)."""
    if weights.type == "int":
        return "int-quantized" if acts is not None else "pack-quantized"
    return "float-quantized" if acts is not None and acts.type == "float" else "naive-quantized"


def quantization_config(model: torch.nn.Module, recipe: Recipe, report: CompressionReport) -> dict | None:
    """The ``quantization_config`` block, or None when nothing was quantized (e.g. 2:4 alone)."""
    groups: dict[str, dict] = {}
    formats: list[str] = []
    ignore: list[str] = []
    for m in recipe.modifiers:
        if not m.quantizes:
            continue
        for g in m.config_groups.values():
            fmt = checkpoint_format(g.weights, g.input_activations)
            formats.append(fmt)
            groups[f"group_{len(groups)}"] = {
                "targets": list(g.targets), "weights": g.weights.checkpoint_dict(),
                "input_activations": g.input_activations.checkpoint_dict() if g.input_activations else None,
                "output_activations": None, "format": fmt}
        ignore.extend(x for x in m.ignore if x not in ignore)
    if not groups:
        return None
    quantized = {name for name, r in report.modules.items() if r.codes is not None}
    for name, module in model.named_modules():
        # Every Linear we did not quantize must be ignored explicitly, or loaders would expect scales.
        if isinstance(module, torch.nn.Linear) and name not in quantized and not matches_any(
                ignore, name, type(module).__name__):
            ignore.append(name)
    top = formats[0] if len(set(formats)) == 1 else "mixed-precision"
    if top != "mixed-precision":
        for g in groups.values():
            g.pop("format")
    return {"quant_method": "compressed-tensors", "format": top, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
            "version": EXPORTER_VERSION}


def _module_tensors(record: ModuleRecord, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    p = record.name
    w = record.weights
    fmt = checkpoint_format(w, record.input_activations)
    scale = record.scale.to(dtype).contiguous()
    out: dict[str, torch.Tensor] = {}
    if fmt == "pack-quantized":
        out[f"{p}.weight_packed"] = pack_int(record.codes, w.num_bits)
        out[f"{p}.weight_shape"] = torch.tensor(record.shape, dtype=torch.int64)
    else:
        out[f"{p}.weight"] = record.codes.contiguous()
    out[f"{p}.weight_scale"] = scale
    if record.input_scale is not None:
        out[f"{p}.input_scale"] = record.input_scale.to(dtype).reshape(1).contiguous()
    return out


def checkpoint_state_dict(model: torch.nn.Module, report: CompressionReport) -> dict[str, torch.Tensor]:
    """Dense tensors of the model with every quantized Linear's weight replaced by its compressed form."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if tied and ptr in seen:  # tied lm_head: safetensors refuses shared storage; HF re-ties on load
            continue
        seen[ptr] = name
        if tensor.is_floating_point():
            tensor = tensor + 0.0  # canonicalize -0.0 → +0.0 (2:4 zeros; vLLM PR #13198)
        tensors[name] = tensor.detach().cpu().contiguous()
    dtype = next(model.parameters()).dtype
    for record in report.modules.values():
        if record.codes is None:
            continue
        tensors.pop(f"{record.name}.weight", None)
        tensors.update(_module_tensors(record, dtype))
    return tensors


def _write_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    weight_map, files = {}, []
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files + ["model.safetensors.index.json"]


def export_checkpoint(model: torch.nn.Module, tokenizer: Any, recipe: Recipe, report: CompressionReport,
                      out_dir: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write the checkpoint into ``out_dir`` (created). Returns {"files": [...], "bytes": int, "format": str}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _write_shards(checkpoint_state_dict(model, report), out, max_shard_bytes)

    config = model.config.to_dict()
    config.pop("quantization_config", None)  # e.g. the GGUF source's; never describe the wrong format
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    qconfig = quantization_config(model, recipe, report)
    if qconfig is not None:
        config["quantization_config"] = qconfig
    compressor_meta = {"version": EXPORTER_VERSION, "preset": recipe.preset, "recipe": recipe.describe(),
                       "sparsity": report.sparsity_stats(), "fallbacks": report.fallbacks}
    config["compressor"] = compressor_meta
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
    log.info("exported %s (%s, %.1f MB)", out, qconfig["format"] if qconfig else "dense", total / 2 ** 20)
    return {"files": files, "bytes": total, "format": qconfig["format"] if qconfig else "dense"}
