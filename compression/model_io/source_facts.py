"""What a job knows about the checkpoint it started from: its storage dtype, its size, its metadata.

The engine may run a model in another dtype than it was published in (float32 on a CPU worker,
the demo model dequantized from a GGUF file), so the export, the size comparison and the model card
ask here instead of looking at the in-memory model:

* `source_dtype(source, model)`: the dtype the source checkpoint stores its weights in (config.json's
  ``dtype``/``torch_dtype``; bfloat16 for the demo, whose GGUF was converted from the bf16 Hub model);
  the export writes unquantized tensors in it.
* `source_checkpoint_bytes(source, model, dtype)`: the size the source's weights take on disk (the
  safetensors files of a local directory, else parameters x dtype size, tied weights once).
* `source_metadata(source)`: licence, licence link, languages and intended use, from the model card
  front matter (README.md) of a local directory or the Hub cache, or the GGUF header of the demo.
  Missing facts are None, never guessed.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import yaml

log = logging.getLogger(__name__)

DEMO_SOURCE_DTYPE = torch.bfloat16  # HuggingFaceTB/SmolLM2-135M-Instruct's safetensors
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "half": torch.float16,
           "float": torch.float32}


def _kind(source: Any) -> str:
    return getattr(source, "kind", None) or ("demo" if source == "demo" else "hub")


def _local_file(source: Any, name: str) -> Path | None:
    """``name`` inside a local source directory, or from the Hub cache (never downloaded here)."""
    kind = _kind(source)
    if kind == "local":
        path = Path(source.value) / name
        return path if path.is_file() else None
    if kind == "hub":
        try:
            from transformers.utils import cached_file

            found = cached_file(source.value, name, revision=getattr(source, "revision", None),
                                local_files_only=True, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
            return Path(found) if found else None
        except Exception:  # noqa: BLE001 - metadata is optional
            return None
    return None


def source_dtype(source: Any, model: Any = None) -> torch.dtype:
    """The dtype the source checkpoint stores its floating-point weights in (default: the model's)."""
    if _kind(source) == "demo":
        return DEMO_SOURCE_DTYPE
    path = _local_file(source, "config.json")
    if path is not None:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            name = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
            if isinstance(name, str) and name.removeprefix("torch.") in _DTYPES:
                return _DTYPES[name.removeprefix("torch.")]
        except (OSError, ValueError) as exc:
            log.warning("could not read the source dtype from %s: %s", path, exc)
    if model is not None:
        return next(model.parameters()).dtype
    return torch.float32


def parameters_bytes(model: Any, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters stored in ``dtype`` (tied weights once; non-float ones as they are)."""
    total = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        size = torch.empty((), dtype=dtype).element_size() if p.is_floating_point() else p.element_size()
        total += p.numel() * size
    return total


def source_checkpoint_bytes(source: Any, model: Any, dtype: torch.dtype) -> int:
    """Size of the source checkpoint's weights: its safetensors files for a local directory, else the
    parameters in the source dtype (what the published safetensors hold, headers aside)."""
    if _kind(source) == "local":
        files = list(Path(source.value).glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files)
    return parameters_bytes(model, dtype)


def _front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"\A\ufeff?---\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", text, flags=re.S)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        meta = None
    return (meta if isinstance(meta, dict) else {}), text[match.end():]


def intended_use_from_card(body: str) -> str | None:
    """The first paragraph under a heading that names the intended use(s), as one line of text."""
    match = re.search(r"^#{1,4}\s*(?:intended uses?(?: & limitations)?|uses?)\s*$\n+(.+?)(?:\n\s*\n|\n#|\Z)",
                      body, flags=re.I | re.M | re.S)
    if not match:
        return None
    text = " ".join(match.group(1).split())
    text = re.sub(r"[<>`|]", "", text)  # one plain line: no markup that could break the card
    return text[:400] or None


def metadata_from_card(text: str) -> dict:
    meta, body = _front_matter(text)
    lic = meta.get("license")
    langs = meta.get("language")
    if isinstance(langs, str):
        langs = [langs]
    return {"license": lic if isinstance(lic, str) and lic else None,
            "license_link": meta.get("license_link") if isinstance(meta.get("license_link"), str) else None,
            "language": [x for x in langs if isinstance(x, str)] if isinstance(langs, list) else None,
            "intended_use": intended_use_from_card(body)}


def _gguf_metadata(path: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key: str) -> Any:
        field = fields.get(key)
        try:
            return field.contents() if field is not None else None
        except Exception:  # noqa: BLE001
            return None

    langs = value("general.languages")
    return {"license": value("general.license") or None, "license_link": None,
            "language": list(langs) if isinstance(langs, list) and langs else None,
            "intended_use": None}


def source_metadata(source: Any) -> dict:
    """{"license", "license_link", "language", "intended_use"} of the source model; None where unknown."""
    empty = {"license": None, "license_link": None, "language": None, "intended_use": None}
    try:
        if _kind(source) == "demo":
            from compression.model_io.loading import DEMO_GGUF, demo_model_dir

            return {**empty, **_gguf_metadata(demo_model_dir() / DEMO_GGUF)}
        readme = _local_file(source, "README.md")
        if readme is None:
            return empty
        return {**empty, **metadata_from_card(readme.read_text(encoding="utf-8", errors="replace"))}
    except Exception as exc:  # noqa: BLE001 - a card without metadata is still a card
        log.warning("could not read the source model's metadata: %s", exc)
        return empty
