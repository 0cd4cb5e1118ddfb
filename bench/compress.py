"""Compression benchmark: every preset on the demo model (SmolLM2-135M-Instruct) with one calibration set.

    python bench/compress.py --samples 128 --seqlen 512 --windows 8
    python bench/compress.py --against llmcompressor [--windows 32] [--samples 128]

``--against llmcompressor``: this engine and llm-compressor 0.14 (its own virtualenv, bench/peer.py)
on the same bf16 weights (the demo dequantized once), the same 128 x 512 WikiText-2 calibration
chunks and the same recipes (W4A16 group-64 GPTQ, 2:4 SparseGPT; the engine's own YAML is handed
to llm-compressor). Each tool runs in a child process (load, compress, save the checkpoint): wall
time and peak RSS are that child's. Both checkpoints are then scored by the same code
(peer.score_checkpoint) on held-out WikiText-2 articles. Writes bench/results/compress_vs_llmcompressor.json.

Each preset runs in its own child process so peak RSS is that preset's alone. Per row: wall time of
compress_model, peak RSS of the child, checkpoint size on disk, WikiText-2 perplexity of the dense
and the compressed model on the same windows. Writes bench/results/compress.json and prints a
Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine, peak_rss_bytes  # noqa: E402

log = logging.getLogger("bench.compress")
DATA_DIR = os.environ.get("COMPRESSOR_DATA_DIR", "/work/shared/data")
CALIBRATION = "calibration/self_instruct_seed_tasks.jsonl"
CASES = {  # row name → (preset, options); SmolLM2's 576-wide inputs rule out group size 128
    "FP8_DYNAMIC": ("FP8_DYNAMIC", {}),
    "FP8": ("FP8", {}),
    "W4A16-g64": ("W4A16", {"group_size": 64}),
    "2:4": ("2:4", {}),
    "2:4+FP8_DYNAMIC": ("2:4+FP8_DYNAMIC", {}),
    "2:4+W4A16": ("2:4+W4A16", {}),
    "W8A8": ("W8A8", {}),
}


def _load():
    from compression.model_io.loading import load_model

    loaded = load_model("demo", allowed_roots=[])
    return loaded.model, loaded.tokenizer


def _ppl(model, tokenizer, seqlen: int, windows: int) -> float:
    from compression.evaluation.perplexity import wikitext_perplexity

    return wikitext_perplexity(model, tokenizer, DATA_DIR, seqlen=seqlen, max_windows=windows)


def run_dense(args: argparse.Namespace) -> dict:
    model, tokenizer = _load()
    return {"ppl_dense": _ppl(model, tokenizer, args.seqlen, args.windows),
            "dtype": str(next(model.parameters()).dtype)}


def run_case(name: str, args: argparse.Namespace) -> dict:
    import torch

    from compression.calibration import load_calibration
    from compression.model_io.export import export_checkpoint
    from compression.recipe import Recipe
    from compression.sequential import compress_model

    torch.set_num_threads(args.threads)
    preset, options = CASES[name]
    model, tokenizer = _load()
    recipe = Recipe.from_preset(preset, **options)
    calib = load_calibration(CALIBRATION, tokenizer, samples=args.samples, seqlen=args.seqlen,
                             data_dir=DATA_DIR) if recipe.needs_calibration else []
    t0 = time.perf_counter()
    report = compress_model(model, recipe, calib)
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_checkpoint(model, tokenizer, recipe, report, tmp)
        weights = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
    ppl = _ppl(model, tokenizer, args.seqlen, args.windows)
    return {"name": name, "wall_s": round(wall, 1), "disk_mb": round(exported["bytes"] / 1e6, 1),
            "weights_mb": round(weights / 1e6, 1), "ppl_compressed": ppl,
            "calibration_samples_used": len(calib),
            "calibration_tokens": int(sum(s["input_ids"].shape[1] for s in calib)),
            "fallbacks": len(report.fallbacks)}


AGAINST_CASES = {"W4A16-g64": ("W4A16", {"group_size": 64}), "2:4": ("2:4", {"reconstruction": False})}  # one-shot vs one-shot


def run_engine_against(name: str, out_dir: str, dtype: str, threads: int, calibration: str) -> dict:
    """Child process: the engine on the bf16 demo directory and the peer's calibration chunks
    (``calibration``: the file the parent wrote with ``peer.save_calibration``, as the peer gets it)."""
    started = time.perf_counter()
    import torch

    sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/kernels.py must not shadow kernels/
    import peer

    from compression.model_io.export import export_checkpoint
    from compression.model_io.loading import load_model
    from compression.recipe import Recipe
    from compression.sequential import compress_model

    torch.set_num_threads(threads)
    model_dir = peer.demo_dense_dir()
    t0 = time.perf_counter()
    loaded = load_model(str(model_dir), allowed_roots=[str(model_dir.parent)], dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - t0
    preset, options = AGAINST_CASES[name]
    recipe = Recipe.from_preset(preset, **options)
    t0, c0 = time.perf_counter(), time.process_time()
    report = compress_model(loaded.model, recipe, peer.calibration_samples(peer.load_calibration(calibration)))
    compress_s, compress_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    export_checkpoint(loaded.model, loaded.tokenizer, recipe, report, out_dir)
    save_s = time.perf_counter() - t0
    return {"wall_s": round(time.perf_counter() - started, 2), "load_s": round(load_s, 2),
            "compress_s": round(compress_s, 2), "save_s": round(save_s, 2), "dtype": dtype,
            "cpu_s": round(time.process_time(), 1), "compress_cpu_s": round(compress_cpu, 1),
            "fallbacks": len(report.fallbacks)}


def against_llmcompressor(args: argparse.Namespace) -> None:
    import torch
    import transformers

    sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/kernels.py must not shadow kernels/
    import peer

    from compression.recipe import Recipe

    peer.ensure_peer_venv()
    model_dir = peer.demo_dense_dir()
    split = peer.article_split(peer.load_tokenizer(model_dir), samples=args.samples, seqlen=args.seqlen)
    work = peer.VAR / "compress-against"
    work.mkdir(parents=True, exist_ok=True)
    calibration = peer.save_calibration(split, work / f"calibration-{args.samples}x{args.seqlen}.safetensors")
    dense = peer.score_checkpoint(model_dir, split, max_windows=args.windows)
    rows = []
    for name in args.only_against:
        preset, options = AGAINST_CASES[name]
        recipe = Recipe.from_preset(preset, **options)
        for tool in ("compressor", "llm-compressor"):
            out = work / f"{tool}-{name.replace(':', '_')}-{args.samples}x{args.seqlen}"
            saved = out / "bench_row.json"
            if args.reuse and saved.exists():  # a finished run of the same case, kept from an earlier call
                row = json.loads(saved.read_text())
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            if out.exists():
                import shutil

                shutil.rmtree(out)
            if tool == "compressor":
                cmd = [sys.executable, __file__, "--engine-case", name, "--engine-out", str(out), "--dtype", args.dtype,
                       "--threads", str(args.threads), "--engine-calibration", str(calibration)]
                proc = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["peak_rss_gb"] = row.pop("own_peak_rss_gb")
            else:
                row = peer.run_llmcompressor(recipe.to_yaml(), out, split=split, model_dir=model_dir,
                                             dtype=args.dtype, threads=args.threads)
            score = peer.score_checkpoint(out, split, max_windows=args.windows)
            row.update(tool=tool, name=name, ppl=score["perplexity"], ppl_dense=dense["perplexity"],
                       ppl_ratio=round(score["perplexity"] / dense["perplexity"], 4), windows=score["windows"])
            rows.append(row)
            saved.write_text(json.dumps(row))
            print(json.dumps(row), flush=True)
    command = "python bench/compress.py " + " ".join(sys.argv[1:])
    result = {"benchmark": "compress-vs-llmcompressor", "command": command.strip(),
              "machine": machine(),
              "date": dt.date.today().isoformat(), "split": split.describe(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peer": rows[-1].get("versions") if rows else None},
              "settings": {"dtype": args.dtype, "threads": args.threads, "scored_windows": args.windows},
              "rows": rows}
    out = ROOT / args.out_against
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_against(result))


def markdown_against(result: dict) -> str:
    return _table(result, ("recipe", "tool", "wall s (process)", "compress s", "CPU s (process)", "compress CPU s",
                           "peak RSS GB", "held-out ppl", "ppl / dense"),
                  lambda r: (r["name"], r["tool"], r["wall_s"], r.get("compress_s", r.get("oneshot_s")),
                             r.get("cpu_s", "—"), r.get("compress_cpu_s", r.get("oneshot_cpu_s", "—")),
                             r["peak_rss_gb"], f"{r['ppl']:.2f}", f"{r['ppl_ratio']:.3f}"))


def _child(flag: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, *flag, "--samples", str(args.samples), "--seqlen", str(args.seqlen),
           "--windows", str(args.windows), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["peak_rss_gb"] = row.pop("own_peak_rss_gb")  # the child's own VmHWM (bench.machine.peak_rss_bytes)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of seqlen tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=list(CASES))
    parser.add_argument("--out", default="bench/results/compress.json", help="result file, relative to the repo")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--against", choices=["llmcompressor"], help="compare with llm-compressor 0.14 (bench/peer.py)")
    parser.add_argument("--only-against", nargs="*", default=list(AGAINST_CASES))
    parser.add_argument("--dtype", default="bfloat16", help="--against: weights dtype of both tools")
    parser.add_argument("--out-against", default="bench/results/compress_vs_llmcompressor.json")
    parser.add_argument("--reuse", action="store_true", help="--against: keep rows of runs already finished in var/")
    parser.add_argument("--engine-case", help=argparse.SUPPRESS)
    parser.add_argument("--engine-out", help=argparse.SUPPRESS)
    parser.add_argument("--engine-calibration", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.engine_case:
        row = run_engine_against(args.engine_case, args.engine_out, args.dtype, args.threads, args.engine_calibration)
        row["own_peak_rss_gb"] = round(peak_rss_bytes() / 2 ** 30, 3)
        print(json.dumps(row))
        return
    if args.against:
        if args.windows == parser.get_default("windows"):
            args.windows = None  # every held-out window unless --windows says otherwise
        against_llmcompressor(args)
        return
    if args.case or args.dense:
        row = run_dense(args) if args.dense else run_case(args.case, args)
        row["own_peak_rss_gb"] = round(peak_rss_bytes() / 2 ** 30, 2)
        print(json.dumps(row))
        return

    import torch
    import transformers

    from compression.errors import RecipeError
    from compression.model_io.loading import load_config
    from compression.preflight import preflight
    from compression.recipe import Recipe

    notes = []
    try:
        preflight(load_config("demo"), Recipe.from_preset("W4A16"))
    except RecipeError as exc:
        notes.append(f"W4A16 with the default group size 128 is refused by preflight: {exc}")
    dense = _child(["--dense"], args)
    rows = []
    for name in args.only:
        started = time.perf_counter()
        row = _child(["--case", name], args)
        row.update(model="SmolLM2-135M-Instruct (demo, GGUF Q4_1 dequantized to fp32)", samples=args.samples,
                   seqlen=args.seqlen, ppl_dense=dense["ppl_dense"],
                   ppl_ratio=round(row["ppl_compressed"] / dense["ppl_dense"], 4),
                   process_s=round(time.perf_counter() - started, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = "python bench/compress.py " + " ".join(sys.argv[1:])
    result = {"benchmark": "compress", "command": command.strip(), "machine": machine(),
              "date": dt.date.today().isoformat(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "settings": {"calibration": CALIBRATION, "wikitext_windows": args.windows, "threads": args.threads,
                           "dense_dtype": dense["dtype"]},
              "notes": notes, "rows": rows}
    out = ROOT / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    return _table(result, ("preset", "samples used (tokens)", "wall s", "peak RSS GB", "disk MB", "ppl dense",
                           "ppl compressed", "ratio"),
                  lambda r: (r["name"], f"{r['calibration_samples_used']} ({r['calibration_tokens']})", r["wall_s"],
                             r["peak_rss_gb"], r["disk_mb"], f"{r['ppl_dense']:.2f}", f"{r['ppl_compressed']:.2f}",
                             f"{r['ppl_ratio']:.3f}"))


def _table(result: dict, headers: tuple[str, ...], cells) -> str:
    """The run's command line, then a Markdown table with one row per result row."""
    lines = [f"`{result['command']}` on {result['machine']} ({result['date']})", "",
             "| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in result["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
