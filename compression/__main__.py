"""Command line: ``python -m compression run --model M --recipe R --out DIR``.

R is a preset name (``W4A16``, ``2:4+FP8_DYNAMIC``, …) or a YAML recipe file. The job runs through
``compression.pipeline.run_job`` exactly as the worker runs it, with a tqdm progress bar.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from compression.errors import RecipeError
from compression.recipe import PRESETS, Recipe


def _default_data_dir() -> str | None:
    import os
    from pathlib import Path

    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return os.environ.get("COMPRESSOR_DATA_DIR") or (str(shared) if shared.is_dir() else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compression", description="Compress an LLM")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="compress, export, evaluate")
    run.add_argument("--model", required=True, help="'demo', a Hub id org/name, or a local directory")
    run.add_argument("--recipe", required=True, help=f"a preset ({', '.join(PRESETS)}) or a YAML file")
    run.add_argument("--out", required=True, help="output directory (must not exist)")
    run.add_argument("--group-size", default=None, help="W4A16 presets: 32, 64, 128 or 'channel'")
    run.add_argument("--calibration", default=None,
                     help="file under the data directory, builtin:chat-v1 or a Hub dataset id (default: the "
                          "data directory's calibration file, else the Hub default when online, else built in)")
    run.add_argument("--samples", type=int, default=128)
    run.add_argument("--seqlen", type=int, default=512)
    run.add_argument("--tasks", default="wikitext2_ppl",
                     help="comma-separated evaluation tasks: wikitext2_ppl (quick WikiText-2 perplexity) "
                          "and/or lm-eval tasks such as arc_easy,hellaswag,wikitext; '' evaluates nothing")
    run.add_argument("--no-speed", action="store_true",
                     help="skip the speed and memory measurement of the dense and the compressed model")
    run.add_argument("--data-dir", default=_default_data_dir(),
                     help="offline data directory (default: $COMPRESSOR_DATA_DIR or ../shared/data)")
    run.add_argument("--device", default=None, help="cpu, cuda or auto")
    run.add_argument("--trust-remote-code", action="store_true")
    return parser


def load_recipe(value: str, group_size: str | None = None) -> Recipe:
    """A preset name (with optional group size) or the path of a YAML recipe."""
    if value in PRESETS:
        options = {}
        if group_size is not None:
            options["group_size"] = None if group_size == "channel" else int(group_size)
        return Recipe.from_preset(value, **options)
    path = Path(value)
    if not path.is_file():
        raise RecipeError("recipe", f"{value!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    if group_size is not None:
        raise RecipeError("group_size", "--group-size only applies to presets; set it in the YAML")
    return Recipe.from_yaml(path.read_text(encoding="utf-8"))


def build_spec(args: argparse.Namespace) -> dict:
    from compression.data_sources import default_calibration_source

    source = args.calibration or default_calibration_source(args.data_dir)
    spec = {"model": args.model, "recipe": load_recipe(args.recipe, args.group_size).to_dict(),
            "calibration": {"source": source, "samples": args.samples, "seqlen": args.seqlen},
            "evaluation": {"tasks": [t.strip() for t in args.tasks.split(",") if t.strip()]},
            "trust_remote_code": bool(args.trust_remote_code)}
    if args.no_speed:
        spec["evaluation"]["speed"] = False
    if args.data_dir:
        spec["data_dir"] = args.data_dir
    if args.device:
        spec["device"] = args.device
    if Path(args.model).is_dir():
        spec["allowed_roots"] = [str(Path(args.model).resolve().parent)]
    return spec


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        spec = build_spec(args)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from compression import pipeline

    bar = tqdm(total=1000, unit="‰", desc="compress")

    def progress(event: dict) -> None:
        if "fraction" in event:
            bar.n = int(1000 * event["fraction"])
        bar.set_description(str(event.get("stage", "")))
        bar.set_postfix_str(str(event.get("message", ""))[:60])
        bar.refresh()

    results = pipeline.run_job(spec, args.out, progress=progress, should_stop=lambda: False)
    bar.close()
    print(json.dumps({k: results.get(k) for k in ("recipe_summary", "size", "speed", "evaluation", "timings")},
                     indent=2, default=str))
    for row in results.get("stage_times") or []:
        print(f"{row['stage']:>28}: {row['seconds']:8.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
