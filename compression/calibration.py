"""Calibration samples: local JSONL/text files under the data directory, or a Hugging Face dataset.

Each sample is one record (or one window of a text file), tokenized and truncated to ``seqlen``
tokens without padding: {"input_ids": LongTensor[1, T], "attention_mask": LongTensor[1, T]}.
Chat records (``messages``) go through the tokenizer's chat template when it has one.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compression.errors import CalibrationError

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".raw", ".tokens")
TEXT_FIELDS = ("text", "instruction", "input", "output", "page", "question")


# A Hub dataset id: org/name in the characters the Hub allows, no "..", never a Storage Bucket path;
# an optional split in datasets' own syntax (train, train_sft, train[:10%]).
HUB_DATASET_ID = re.compile(r"^(?!buckets/)(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
HUB_SPLIT = re.compile(r"^[A-Za-z0-9_]{1,64}(\[[0-9:%-]{0,32}\])?$")
MAX_SOURCE_CHARS = 300


@dataclass(frozen=True)
class CalibrationSource:
    """What a calibration source names: a file of the data directory, or a Hub dataset (+ split)."""

    kind: str  # "file" | "hub"
    path: Path | None = None
    repo_id: str | None = None
    split: str = "train"


def classify_source(source: str, data_dir: str | os.PathLike | None) -> CalibrationSource:
    """Exactly one of: a file inside ``data_dir`` (symlinks resolved, no escape), or a Hub dataset id
    ``org/name[:split]`` that is never resolved against the local filesystem. Anything else, including
    an id that happens to exist as a path relative to the working directory, is a CalibrationError."""
    if not isinstance(source, str) or not source.strip() or len(source) > MAX_SOURCE_CHARS \
            or not source.isprintable():
        raise CalibrationError(f"must be a data-directory file or a Hugging Face dataset id "
                               f"(printable, at most {MAX_SOURCE_CHARS} characters)")
    if is_local_source(source, data_dir):
        if not data_dir:
            raise CalibrationError(f"{source!r} looks like a file, but no data directory is configured "
                                   "(COMPRESSOR_DATA_DIR); upload the file instead")
        return CalibrationSource("file", path=resolve_local(source, data_dir))
    repo_id, split = parse_hub_dataset(source)
    return CalibrationSource("hub", repo_id=repo_id, split=split)


def parse_hub_dataset(source: str) -> tuple[str, str]:
    """(repo id, split) of ``org/name[:split]``, checked strictly."""
    repo_id, has_split, split = source.partition(":")
    if not HUB_DATASET_ID.match(repo_id) or (has_split and not HUB_SPLIT.match(split)):
        raise CalibrationError(f"{source!r} is neither a file under the data directory, an uploaded file "
                               "(upload:<id>) nor a Hub dataset id like org/name or org/name:split")
    if os.path.lexists(repo_id):
        # datasets would load such a path as a local directory; load_calibration never does (hf://),
        # and refusing it here too makes the answer the same wherever the check runs.
        raise CalibrationError(f"{repo_id!r} names a path on the server, not a Hub dataset; use a file of the "
                               "data directory or upload your file")
    return repo_id, split or "train"


def resolve_local(source: str, data_dir: str | os.PathLike) -> Path:
    """``source`` resolved inside ``data_dir``; anything escaping it (``..``, absolute paths) is refused."""
    if not data_dir:
        raise CalibrationError("no data directory is configured (COMPRESSOR_DATA_DIR)")
    root = Path(data_dir).resolve()
    path = (root / source).resolve()
    if not path.is_relative_to(root):
        raise CalibrationError(f"calibration source {source!r} lies outside the data directory {root}; "
                               "use a path relative to it, e.g. calibration/self_instruct_seed_tasks.jsonl")
    if not path.is_file():
        raise CalibrationError(f"calibration file {source!r} not found under {root}")
    return path


def record_text(record: Any, tokenizer: Any) -> tuple[str, bool]:
    """(text, already_templated) of one record: chat template for ``messages`` when available."""
    if isinstance(record, str):
        return record, False
    if not isinstance(record, dict):
        return "", False
    messages = record.get("messages")
    if messages and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False), True
    if messages:
        return "\n\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict)), False
    parts = [str(record[k]) for k in TEXT_FIELDS if isinstance(record.get(k), str) and record[k].strip()]
    return "\n\n".join(parts), False


def parse_records(text: str, suffix: str) -> list[Any]:
    """Records of a calibration file's text: one per JSONL line, the items of a JSON list, or the
    paragraphs (> 200 characters) of plain text. Malformed JSON raises CalibrationError naming the line."""
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            records.append(_bounded_json(line, f"line {number}"))
        return records
    if suffix == ".json":
        data = _bounded_json(text, "the file")
        return data if isinstance(data, list) else [data]
    paragraphs = [p.strip() for p in text.split("\n\n")]
    return [p for p in paragraphs if len(p) > 200]


MAX_RECORD_DEPTH = 32  # a chat record is about four levels deep


def _bounded_json(text: str, where: str) -> Any:
    """json.loads, with every way it can fail (bad syntax, an integer of thousands of digits, nesting
    deep enough to exhaust the stack) and nesting past MAX_RECORD_DEPTH as a CalibrationError."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        line = f" at line {exc.lineno}" if where == "the file" else ""
        raise CalibrationError(f"{where} is not valid JSON ({exc.msg}{line})") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise CalibrationError(f"{where} is not usable JSON ({exc})") from None
    except RecursionError:
        raise CalibrationError(f"{where} is nested more than {MAX_RECORD_DEPTH} levels deep") from None
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_RECORD_DEPTH:
                raise CalibrationError(f"{where} is nested more than {MAX_RECORD_DEPTH} levels deep")
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return data


def _local_records(path: Path) -> list[Any]:
    return parse_records(path.read_text(encoding="utf-8"), path.suffix)


def _load_hub_dataset(source: str, split: str, seed: int, limit: int) -> list[Any]:
    """Download ``limit`` shuffled records of a Hub dataset (needs network; the tests point
    compression.data_sources.hub_load_dataset at local fixtures).

    The download goes through datasets' remote-only ``hf://datasets/`` form (see hub_load_dataset): a
    bare ``org/name`` that exists as a directory relative to the working directory would be loaded
    from there instead."""
    from compression.data_sources import hub_load_dataset

    if not HUB_DATASET_ID.match(source):
        raise CalibrationError(f"{source!r} is not a Hub dataset id like org/name")
    try:
        ds = hub_load_dataset(source, split=split)
    except (OSError, ValueError, RuntimeError) as exc:  # not found, gated, offline, bad split
        raise CalibrationError(f"could not load the Hub dataset {source!r} (split {split!r}): {exc}") from exc
    ds = ds.shuffle(seed=seed).select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


def is_builtin(source: str) -> bool:
    """``builtin:<name>``: a calibration set shipped inside this package (compression/builtin_data)."""
    from compression.data_sources import is_builtin as _is_builtin

    return _is_builtin(source)


def _builtin_records(source: str) -> list[Any]:
    from compression.data_sources import DataUnavailable, builtin_records

    try:
        return builtin_records(source)
    except DataUnavailable as exc:
        raise CalibrationError(str(exc)) from None


def is_local_source(source: str, data_dir: str | os.PathLike | None) -> bool:
    """Whether ``source`` is meant as a file of the data directory (never relative to the cwd)."""
    return source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~")) \
        or bool(data_dir and (Path(data_dir) / source).exists())


def load_calibration(source: str, tokenizer: Any, *, samples: int, seqlen: int,
                     data_dir: str | os.PathLike, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Up to ``samples`` tokenized samples of at most ``seqlen`` tokens (shuffled with ``seed``).

    ``source``: a file relative to ``data_dir`` (.jsonl/.json records or plain text), a built-in set
    (``builtin:chat-v1``) or a Hub dataset id ``org/name`` (optionally ``org/name:split``, default
    split ``train``).
    """
    if samples < 1 or seqlen < 2:
        raise CalibrationError("calibration needs samples ≥ 1 and seqlen ≥ 2")
    where = None if is_builtin(source) else classify_source(source, data_dir)
    if where is None:
        records = _builtin_records(source)
        random.Random(seed).shuffle(records)
    elif where.kind == "file":
        records = _local_records(where.path)
        random.Random(seed).shuffle(records)
    else:
        records = _load_hub_dataset(where.repo_id, where.split, seed, samples * 2)
    out: list[dict[str, torch.Tensor]] = []
    for record in records:
        text, templated = record_text(record, tokenizer)
        if not text.strip():
            continue
        enc = tokenizer(text, add_special_tokens=not templated, truncation=True, max_length=seqlen,
                        return_tensors="pt")
        ids = enc["input_ids"][:, :seqlen]
        if ids.shape[1] < 2:
            continue
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        if len(out) == samples:
            break
    if not out:
        raise CalibrationError(f"no usable text in calibration source {source!r}")
    if len(out) < samples:
        log.warning("calibration source %s gave %d of %d requested samples", source, len(out), samples)
    tokens = sum(s["input_ids"].shape[1] for s in out)
    log.info("calibration: %d samples, %d tokens (max %d per sample) from %s", len(out), tokens, seqlen, source)
    return out
