"""The peer (llm-compressor 0.14) and the held-out WikiText-2 protocol shared by the comparison benches.

Used by ``bench/compress.py --against llmcompressor`` (wall time / memory), ``bench/quality.py``
(accuracy parity) and ``bench/recovery.py``. Nothing here is imported by the product.

Where things live (``VAR`` = ``$COMPRESSOR_BENCH_VAR`` or ``<repo>/var``; point several checkouts at
one directory to share the virtualenv and the weights)::

    VAR/peer-llmcompressor/   virtualenv: torch==2.13.0 (the local CPU wheel, installed first so
                              nothing pulls CUDA wheels), then llmcompressor==0.14.0 and what it pins
    VAR/demo-bf16/            the demo model (GGUF Q4_1) dequantized once to a bf16 safetensors
                              directory + tokenizer: both tools start from these exact weights

API (all paths are ``pathlib.Path``)::

    ensure_peer_venv() -> Path
        Create the peer virtualenv if missing (file-locked, so parallel callers wait); returns its python.
    demo_dense_dir() -> Path
        Create VAR/demo-bf16 if missing (file-locked); returns it. A plain transformers checkpoint.
    load_tokenizer(model_dir=None)
        The tokenizer of ``model_dir`` (default: demo_dense_dir()).
    article_split(tokenizer, samples=128, seqlen=512) -> Split
        WikiText-2 raw test, one record per article (62 articles). The first whole articles whose
        tokens reach samples x seqlen are the calibration articles: their concatenated tokens cut
        into ``samples`` chunks of ``seqlen`` (Split.calibration, LongTensor [samples, seqlen]).
        Every later article is held out: their concatenated tokens cut into every non-overlapping
        ``seqlen`` window (Split.evaluation, LongTensor [n, seqlen]). No article is in both.
    calibration_samples(split) -> list[{"input_ids": [1, T], "attention_mask": [1, T]}]
        Split.calibration in the engine's calibration format (compression.sequential.compress_model).
    perplexity(model, windows, batch_size=4, max_windows=None) -> float
        exp(mean next-token NLL) over the windows: compression.evaluation.perplexity.perplexity_on_windows,
        the product's own code, so the product's numbers and the bench's are the same measure.
    score_checkpoint(checkpoint_dir, split=None, *, max_windows=None, dtype=torch.float32) -> dict
        Load any checkpoint directory (dense, or compressed-tensors from either tool) through
        transformers' AutoModelForCausalLM (compressed-tensors weights decompressed at load, so
        the same forward code runs for every checkpoint) and score it with perplexity() on the held-out windows.
        Returns {"perplexity", "windows", "tokens", "seconds"}.
    run_llmcompressor(recipe_yaml, out_dir, *, split, model_dir=None, dtype="auto", threads=None) -> dict
        Run llm-compressor's ``oneshot`` with that recipe (llm-compressor YAML; the engine's
        ``Recipe.to_yaml()`` is accepted as is) on ``model_dir`` (default demo_dense_dir()) and
        Split.calibration, in the peer virtualenv (bench/peer_oneshot.py, a child process), saving
        the compressed checkpoint to ``out_dir``. Returns the child's JSON: {"wall_s" (whole child
        process), "load_s", "oneshot_s", "save_s", "peak_rss_gb" (the child's ru_maxrss), "versions"}.

Command line::

    python bench/peer.py setup              # venv + bf16 demo dir + print the split's sizes
    python bench/peer.py score DIR [--max-windows N]
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.peer")

VAR = Path(os.environ.get("COMPRESSOR_BENCH_VAR") or ROOT / "var")
PEER_VENV = VAR / "peer-llmcompressor"
DEMO_DENSE = VAR / "demo-bf16"
DATA_DIR = Path(os.environ.get("COMPRESSOR_DATA_DIR") or ROOT.parent / "shared" / "data")
PAGES = Path("wikitext2") / "wikitext2_test_pages.jsonl"
# llm-compressor 0.14.0 and the versions pip resolved for it on 2026-12-02, pinned so every run is the same peer
PEER_PACKAGES = ("llmcompressor==0.14.0", "compressed-tensors==0.19.0", "transformers==5.17.0", "accelerate==1.15.0",
                 "datasets==5.0.1")
TORCH = "torch==2.13.0"
ONESHOT_SCRIPT = Path(__file__).resolve().parent / "peer_oneshot.py"


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive file lock under VAR, so two benches never build the same thing at once."""
    VAR.mkdir(parents=True, exist_ok=True)
    with open(VAR / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def peer_python() -> Path:
    return PEER_VENV / "bin" / "python"


def ensure_peer_venv() -> Path:
    """The peer virtualenv's python, created on first use (torch first, then llm-compressor)."""
    marker = PEER_VENV / ".complete"
    with _locked("peer-venv"):
        if not marker.exists():
            log.info("creating %s (torch, then %s)", PEER_VENV, ", ".join(PEER_PACKAGES))
            base = Path(getattr(sys, "_base_executable", sys.executable))
            subprocess.run([str(base), "-m", "venv", str(PEER_VENV)], check=True)
            pip = [str(peer_python()), "-m", "pip", "install", "-q"]
            subprocess.run([*pip, TORCH], check=True)
            subprocess.run([*pip, *PEER_PACKAGES], check=True)
            marker.write_text(json.dumps({"packages": [TORCH, *PEER_PACKAGES]}))
    return peer_python()


def demo_dense_dir() -> Path:
    """VAR/demo-bf16: the demo GGUF dequantized once into a bf16 safetensors checkpoint + tokenizer."""
    marker = DEMO_DENSE / ".complete"
    with _locked("demo-bf16"):
        if not marker.exists():
            from compression.model_io.loading import load_model

            loaded = load_model("demo", allowed_roots=[], dtype=torch.bfloat16)
            tmp = Path(tempfile.mkdtemp(prefix=".demo-bf16-", dir=VAR))
            _save_plain(loaded.model, tmp)
            loaded.tokenizer.save_pretrained(tmp)
            (tmp / ".complete").write_text(json.dumps(loaded.identity))
            if DEMO_DENSE.exists():
                import shutil

                shutil.rmtree(DEMO_DENSE)
            tmp.rename(DEMO_DENSE)
    return DEMO_DENSE


def _save_plain(model, out: Path) -> None:
    """save_pretrained refuses GGUF-loaded models, so write config + one safetensors file by hand."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def load_tokenizer(model_dir: str | Path | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir or demo_dense_dir()))


@dataclass
class Split:
    """Calibration chunks and held-out evaluation windows, cut from disjoint whole articles."""

    calibration: torch.Tensor  # LongTensor [samples, seqlen]
    evaluation: torch.Tensor  # LongTensor [windows, seqlen]
    calibration_articles: int
    evaluation_articles: int
    seqlen: int

    def describe(self) -> dict:
        return {"calibration_articles": self.calibration_articles, "calibration_chunks": self.calibration.shape[0],
                "evaluation_articles": self.evaluation_articles, "evaluation_windows": self.evaluation.shape[0],
                "seqlen": self.seqlen, "source": str(PAGES)}


def _articles() -> list[str]:
    path = DATA_DIR / PAGES
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; set COMPRESSOR_DATA_DIR to the offline data directory")
    return [json.loads(line)["page"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def article_split(tokenizer, samples: int = 128, seqlen: int = 512) -> Split:
    """See the module docstring: first whole articles → calibration, the rest → held-out windows."""
    ids = [tokenizer(page, add_special_tokens=False, return_tensors="pt")["input_ids"][0] for page in _articles()]
    need = samples * seqlen
    taken, total = 0, 0
    while total < need and taken < len(ids):
        total += ids[taken].numel()
        taken += 1
    if total < need or taken == len(ids):
        raise ValueError(f"WikiText-2 has too few tokens for {samples} x {seqlen} calibration tokens "
                         "and a held-out part")
    calibration = torch.cat(ids[:taken])[:need].view(samples, seqlen)
    held_out = torch.cat(ids[taken:])
    windows = held_out.numel() // seqlen
    return Split(calibration, held_out[: windows * seqlen].view(windows, seqlen), taken, len(ids) - taken, seqlen)


def save_calibration(split: Split, path: str | Path) -> Path:
    """The split's calibration chunks as a safetensors file ({"input_ids": [samples, seqlen]}): how a
    tool's child process gets them (no child tokenizes WikiText, whose ~250 MB would count in its peak)."""
    from safetensors.torch import save_file

    save_file({"input_ids": split.calibration.contiguous()}, str(path))
    return Path(path)


def load_calibration(path: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["input_ids"]


def calibration_samples(split: Split | torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """One sample per calibration chunk, from a split or from its [samples, seqlen] ids."""
    rows = split.calibration if isinstance(split, Split) else split
    return [{"input_ids": row.view(1, -1).clone(), "attention_mask": torch.ones(1, row.numel(), dtype=torch.long)}
            for row in rows]


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, max_windows: int | None = None) -> float:
    from compression.evaluation.perplexity import perplexity_on_windows

    if max_windows is not None:
        windows = windows[:max_windows]
    return perplexity_on_windows(model, windows, batch_size=batch_size)


def score_checkpoint(checkpoint_dir: str | Path, split: Split | None = None, *, max_windows: int | None = None,
                     dtype: torch.dtype = torch.float32, batch_size: int = 4) -> dict:
    """Held-out perplexity of any checkpoint directory, loaded through transformers (see module docstring)."""
    from transformers import AutoModelForCausalLM

    checkpoint_dir = Path(checkpoint_dir)
    started = time.perf_counter()
    kwargs: dict = {"dtype": dtype}
    config = json.loads((checkpoint_dir / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), **kwargs)
    model.eval()
    split = split or article_split(load_tokenizer(checkpoint_dir))
    windows = split.evaluation if max_windows is None else split.evaluation[:max_windows]
    ppl = perplexity(model, windows, batch_size=batch_size)
    return {"perplexity": ppl, "windows": int(windows.shape[0]), "tokens": int(windows[:, 1:].numel()),
            "seconds": round(time.perf_counter() - started, 1)}


def run_llmcompressor(recipe_yaml: str, out_dir: str | Path, *, split: Split, model_dir: str | Path | None = None,
                      dtype: str = "auto", threads: int | None = None) -> dict:
    """llm-compressor ``oneshot`` in the peer virtualenv (child process); see the module docstring."""
    python = ensure_peer_venv()
    model_dir = Path(model_dir or demo_dense_dir())
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        recipe_path, calib_path = Path(tmp) / "recipe.yaml", Path(tmp) / "calibration.safetensors"
        recipe_path.write_text(recipe_yaml, encoding="utf-8")
        save_calibration(split, calib_path)
        cmd = [str(python), str(ONESHOT_SCRIPT), "--model", str(model_dir), "--recipe", str(recipe_path),
               "--calibration", str(calib_path), "--out", str(out_dir), "--dtype", dtype]
        if threads:
            cmd += ["--threads", str(threads)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"llm-compressor oneshot failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="peer set-up and held-out scoring")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="create the peer virtualenv and the bf16 demo directory; print the split")
    score = sub.add_parser("score", help="held-out WikiText-2 perplexity of a checkpoint directory")
    score.add_argument("checkpoint")
    score.add_argument("--max-windows", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "setup":
        python = ensure_peer_venv()
        model_dir = demo_dense_dir()
        split = article_split(load_tokenizer(model_dir))
        print(json.dumps({"peer_python": str(python), "demo_dense_dir": str(model_dir), **split.describe()}))
    else:
        print(json.dumps(score_checkpoint(args.checkpoint, max_windows=args.max_windows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
