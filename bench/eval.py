"""Accuracy benchmark: the demo model before and after compression, scored with lm-eval offline.

    python bench/eval.py --preset W4A16 --group-size 64 --limit 100

Loads the demo model (SmolLM2-135M-Instruct), scores it on local lm-eval tasks, compresses it
in memory with the engine (`compression.sequential.compress_model`, fake-quantized weights),
scores it again and writes bench/results/eval.json (shape: shared/BENCH_RESULTS.md) plus a
Markdown table on stdout for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import machine  # noqa: E402

from compression.evaluation.harness import EvalSettings, evaluate  # noqa: E402
from compression.evaluation.recovery import AVERAGE, recovery_table  # noqa: E402

log = logging.getLogger("bench.eval")
DEFAULT_DATA = REPO.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,piqa,winogrande,lambada_openai,wikitext")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--preset", default="W4A16")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "eval.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from compression.calibration import load_calibration
    from compression.model_io.loading import load_model
    from compression.recipe import Recipe
    from compression.sequential import compress_model

    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_model("demo")
    settings = EvalSettings(tasks=args.tasks.split(","), limit=args.limit, batch_size=args.batch_size,
                            data_source="local")
    t0 = time.perf_counter()
    baseline = evaluate(loaded.model, loaded.tokenizer, settings, data_dir=args.data_dir)
    log.info("baseline evaluated in %.0fs", time.perf_counter() - t0)

    options = {"group_size": args.group_size} if args.preset in ("W4A16",) else {}
    recipe = Recipe.from_preset(args.preset, **options)
    calibration = load_calibration("calibration/self_instruct_seed_tasks.jsonl", loaded.tokenizer,
                                   samples=args.samples, seqlen=args.seqlen, data_dir=args.data_dir) \
        if recipe.needs_calibration else []
    t1 = time.perf_counter()
    compress_model(loaded.model, recipe, calibration)
    compress_s = time.perf_counter() - t1
    log.info("compressed (%s) in %.0fs", args.preset, compress_s)
    compressed = evaluate(loaded.model, loaded.tokenizer, settings, data_dir=args.data_dir)

    name = f"{args.preset}-g{args.group_size}" if options else args.preset
    rows = [{"name": name, "task": r["task"], "metric": r["metric"], "baseline": r["baseline"],
             "compressed": r["compressed"], "recovery_pct": r["recovery_pct"], "primary": r["primary"],
             "limit": args.limit, "samples": (baseline["tasks"].get(r["task"]) or {}).get("samples")}
            for r in recovery_table(baseline, compressed)]
    command = "python bench/eval.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = {
        "benchmark": "eval", "command": command.strip(), "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "versions": {p: version(p) for p in ("torch", "transformers", "lm_eval", "datasets")},
        "model": loaded.identity.get("name"), "calibration": {"samples": len(calibration), "seqlen": args.seqlen},
        "compress_s": round(compress_s, 1), "eval_s": {"baseline": baseline["seconds"],
                                                        "compressed": compressed["seconds"]},
        "settings": baseline["settings"], "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %s", args.out)

    lines = ["| task | metric | dense | " + name + " | recovery |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        fmt = (lambda v: "n/a" if v is None else f"{v:.4f}")
        task = f"**{AVERAGE}**" if r["task"] == AVERAGE else r["task"]
        rec = "n/a" if r["recovery_pct"] is None else f"{r['recovery_pct']:.1f}%"
        lines.append(f"| {task} | {r['metric']} | {fmt(r['baseline'])} | {fmt(r['compressed'])} | {rec} |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
