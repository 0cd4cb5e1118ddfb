"""Compression benchmark: every preset on the demo model (SmolLM2-135M-Instruct) with one calibration set.

    python bench/compress.py --samples 128 --seqlen 512 --windows 8

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
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    from compression.loading import load_model

    loaded = load_model("demo", allowed_roots=[])
    return loaded.model, loaded.tokenizer


def _ppl(model, tokenizer, seqlen: int, windows: int) -> float:
    from compression.perplexity import wikitext_perplexity

    return wikitext_perplexity(model, tokenizer, DATA_DIR, seqlen=seqlen, max_windows=windows)


def run_dense(args: argparse.Namespace) -> dict:
    model, tokenizer = _load()
    return {"ppl_dense": _ppl(model, tokenizer, args.seqlen, args.windows),
            "dtype": str(next(model.parameters()).dtype)}


def run_case(name: str, args: argparse.Namespace) -> dict:
    import torch

    from compression.calibration import load_calibration
    from compression.export import export_checkpoint
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


def _child(flag: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, *flag, "--samples", str(args.samples), "--seqlen", str(args.seqlen),
           "--windows", str(args.windows), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["peak_rss_gb"] = row.pop("own_peak_rss_gb")  # the child's own ru_maxrss (Linux: KiB)
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.case or args.dense:
        row = run_dense(args) if args.dense else run_case(args.case, args)
        row["own_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
        print(json.dumps(row))
        return

    import torch
    import transformers

    from compression.errors import RecipeError
    from compression.loading import load_config
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
    result = {"benchmark": "compress", "command": command.strip(), "machine": "2-core CPU, 24 GB",
              "date": dt.date.today().isoformat(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "settings": {"calibration": CALIBRATION, "wikitext_windows": args.windows, "threads": args.threads,
                           "dense_dtype": dense["dtype"]},
              "notes": notes, "rows": rows}
    out = ROOT / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}` on {result['machine']} ({result['date']})", "",
             "| preset | samples used (tokens) | wall s | peak RSS GB | disk MB | ppl dense | ppl compressed | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['calibration_samples_used']} ({r['calibration_tokens']}) | {r['wall_s']} | "
                     f"{r['peak_rss_gb']} | {r['disk_mb']} | {r['ppl_dense']:.2f} | {r['ppl_compressed']:.2f} | "
                     f"{r['ppl_ratio']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
