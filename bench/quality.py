"""Side-by-side quality: the same llm-compressor recipe through this engine and through llm-compressor 0.14.

    python bench/quality.py [--samples 128] [--seqlen 512] [--max-windows N] [--only ROW ...]
                            [--out bench/results/quality.json]

Both tools start from the same weights (bench/peer.py's bf16 demo checkpoint), calibrate on the
same WikiText-2 chunks and are scored by the same perplexity code over the same held-out windows
(bench/peer.py: ``article_split`` / ``calibration_samples`` / ``perplexity``). Each row's recipe
is one llm-compressor YAML text, given unchanged to ``oneshot`` in the peer virtualenv and to
``Recipe.from_yaml`` here. Both checkpoints of a row are loaded by the same loader: transformers
(compressed-tensors decompression) — except asymmetric pack-quantized rows, which transformers 5.23
+ compressed-tensors 0.20 refuse for every producer (their empty module expects the zero point
unpacked, every checkpoint holds it packed), so both tools' checkpoints of those rows go through
``compression.model_io.runtime.load_compressed_model`` (compressed-tensors' dequantization arithmetic).

Writes bench/results/quality.json: the split, the dense perplexity, and per row and tool the
perplexity, its ratio to dense, and the compression / scoring seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import peer  # noqa: E402
from bench.machine import machine, peak_rss_bytes  # noqa: E402

_W4 = "{{num_bits: 4, type: int, symmetric: {sym}, strategy: group, group_size: 64}}"


def _quant(modifier: str, weights: str, extra: str = "") -> str:
    return (f"    {modifier}:\n      ignore: [lm_head]\n{extra}      config_groups:\n        group_0:\n"
            f"          targets: [Linear]\n          weights: {weights}\n")


ROWS: dict[str, str] = {
    "W4A16 g64 GPTQ": "quant_stage:\n  quant_modifiers:\n" + _quant("GPTQModifier", _W4.format(sym="true")),
    "W4A16_ASYM g64 GPTQ": "quant_stage:\n  quant_modifiers:\n" + _quant("GPTQModifier", _W4.format(sym="false")),
    # AutoRound at 50 steps per layer (its default is 200: 4x the time, out of reach on a 2-core CPU for both
    # tools in one sitting); torch.compile off for llm-compressor's CPU run (no effect here)
    "W4A16 g64 AutoRound 50": "quant_stage:\n  quant_modifiers:\n" + _quant(
        "AutoRoundModifier", _W4.format(sym="true"),
        "      iters: 50\n      batch_size: 8\n      enable_torch_compile: false\n"),
    "W4A16_ASYM g64 AutoRound 50": "quant_stage:\n  quant_modifiers:\n" + _quant(
        "AutoRoundModifier", _W4.format(sym="false"),
        "      iters: 50\n      batch_size: 8\n      enable_torch_compile: false\n"),
    "W4A16_ASYM g64 AWQ": ("quant_stage:\n  quant_modifiers:\n    AWQModifier: {duo_scaling: true}\n"
                           + _quant("QuantizationModifier", _W4.format(sym="false"))),
    "FP8_DYNAMIC": ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      ignore: [lm_head]\n"
                    "      targets: [Linear]\n      scheme: FP8_DYNAMIC\n"),
    "W8A8 + SmoothQuant": ("quant_stage:\n  quant_modifiers:\n    SmoothQuantModifier: {smoothing_strength: 0.8}\n"
                           "    GPTQModifier:\n      ignore: [lm_head]\n      targets: [Linear]\n      scheme: W8A8\n"),
    "2:4 SparseGPT": ("sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier:\n      sparsity: 0.5\n"
                      "      mask_structure: '2:4'\n      targets: [Linear]\n      ignore: [lm_head]\n"),
    "2:4 + FP8_DYNAMIC": ("sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier:\n      sparsity: 0.5\n"
                          "      mask_structure: '2:4'\n      targets: [Linear]\n      ignore: [lm_head]\n"
                          "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      ignore: [lm_head]\n"
                          "      targets: [Linear]\n      scheme: FP8_DYNAMIC\n"),
    # llm-compressor 0.14's SparseGPT/Wanda name a module "<name>." when it matches `ignore`, so a plain
    # `ignore: [lm_head]` misses the head and it is pruned (with tied embeddings, the embedding table too);
    # the regex its own warning suggests does match. This row gives both tools that ignore: the algorithms
    # compared on the same modules. Not a preset (the quality table for Recommend leaves it out).
    "2:4 SparseGPT, ignore re:.*lm_head": ("sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier:\n"
                                          "      sparsity: 0.5\n      mask_structure: '2:4'\n      targets: [Linear]\n"
                                          "      ignore: ['re:.*lm_head']\n"),
}
# llm-compressor's AWQ replays each mapping's parent (the whole attention block included) per grid point in the
# model's dtype: in bfloat16 on this CPU, eager attention runs 14x slower than in float32 (303 vs 22 ms for one
# 512-token call), 7.5 minutes per decoder layer on 32 chunks; it never finished here. Its AWQ row loads the
# model in float32 (unquantized tensors keep the bf16 checkpoint's values; the norms it folds scales into stay
# float32, if anything an advantage to it). This engine computes each layer in float32 on a CPU anyway.
PEER_DTYPE = {"W4A16_ASYM g64 AWQ": "float32", "W4A16_ASYM g64 RTN imatrix_mse": "float32",
              "W4A16_ASYM g64 AWQ, 32 chunks": "float32"}
# Even in float32 llm-compressor's AWQ takes about 4 minutes per decoder layer of the demo on 128 chunks (two hours
# on the 2-core machine, as long as ours): this comparison-only row runs the same recipe on the first 32 of the
# same 128 calibration chunks, for both tools, scored on the same windows as every row
ROWS["W4A16_ASYM g64 AWQ, 32 chunks"] = ROWS["W4A16_ASYM g64 AWQ"]
CALIBRATION_CHUNKS = {"W4A16_ASYM g64 AWQ, 32 chunks": 32}
# llm-compressor 0.14's importance-weighted MSE observer (E[x²] per input channel) on round-to-nearest:
# the same observer in both tools, a comparison-only row
ROWS["W4A16_ASYM g64 RTN imatrix_mse"] = "quant_stage:\n  quant_modifiers:\n" + _quant(
    "QuantizationModifier", "{num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 64, "
    "observer: imatrix_mse}")
ASYMMETRIC = ("W4A16_ASYM g64 GPTQ", "W4A16_ASYM g64 AWQ", "W4A16_ASYM g64 AutoRound 50",
              "W4A16_ASYM g64 RTN imatrix_mse", "W4A16_ASYM g64 AWQ, 32 chunks")
TOOLS = ("ours", "llmcompressor")
# the form/API preset that builds the same recipe (compression.recommend reads this from the table)
PRESET_OF_ROW: dict[str, dict] = {
    "W4A16 g64 GPTQ": {"preset": "W4A16", "options": {"group_size": 64}},
    "W4A16_ASYM g64 GPTQ": {"preset": "W4A16_ASYM", "options": {"group_size": 64}},
    "W4A16_ASYM g64 AWQ": {"preset": "AWQ+W4A16_ASYM", "options": {"group_size": 64}},
    "W4A16 g64 AutoRound 50": {"preset": "AutoRound+W4A16", "options": {"group_size": 64, "iters": 50}},
    "W4A16_ASYM g64 AutoRound 50": {"preset": "AutoRound+W4A16_ASYM", "options": {"group_size": 64, "iters": 50}},
    "FP8_DYNAMIC": {"preset": "FP8_DYNAMIC", "options": {}},
    "W8A8 + SmoothQuant": {"preset": "SQ+W8A8", "options": {}},
    "2:4 SparseGPT": {"preset": "2:4", "options": {}},
    "2:4 + FP8_DYNAMIC": {"preset": "2:4+FP8_DYNAMIC", "options": {}},
}


def nominal_weight_bits(recipe_yaml: str) -> float:
    from compression.recommend import nominal_weight_bits as bits
    from compression.recipe import Recipe

    return bits(Recipe.from_yaml(recipe_yaml))


def _score(directory: Path, split, max_windows: int | None, ours_loader: bool) -> dict:
    if not ours_loader:
        return peer.score_checkpoint(directory, split, max_windows=max_windows)
    from compression.model_io.runtime import load_compressed_model

    t0 = time.perf_counter()
    model = load_compressed_model(directory, dtype=torch.float32)
    ppl = peer.perplexity(model, split.evaluation, max_windows=max_windows)
    windows = min(split.evaluation.shape[0], max_windows or split.evaluation.shape[0])
    return {"perplexity": ppl, "windows": windows, "tokens": windows * split.seqlen,
            "seconds": round(time.perf_counter() - t0, 1), "loader": "compression.model_io.runtime"}


def run_ours_child(row: str, out_dir: Path, split) -> dict:
    """``run_ours`` in a child process, as llm-compressor runs in one: its wall time, CPU time and
    peak RSS are the compression's own (load, compress, export), not the scoring's. Like the peer's
    child it gets the calibration chunks as a safetensors file (it does not tokenize WikiText)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ours-") as tmp:
        calib_path = peer.save_calibration(split, Path(tmp) / "calibration.safetensors")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--ours-child", row, "--child-out", str(out_dir),
               "--child-calibration", str(calib_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"engine child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_main(row: str, out_dir: str, calibration: str) -> int:
    started = time.perf_counter()
    model_dir = peer.demo_dense_dir()
    ids = peer.load_calibration(calibration)
    info = run_ours(ROWS[row], Path(out_dir), ids, model_dir)
    info.update(wall_s=round(time.perf_counter() - started, 1), cpu_s=round(time.process_time(), 1),
                peak_rss_gb=round(peak_rss_bytes() / 2 ** 30, 3))
    print(json.dumps(info), flush=True)
    return 0


def run_ours(recipe_yaml: str, out_dir: Path, calibration: torch.Tensor, model_dir: Path) -> dict:
    """This engine: load the bf16 demo checkpoint, compress with the row's recipe, export."""
    from transformers import AutoModelForCausalLM

    from compression.model_io.export import export_checkpoint
    from compression.recipe import Recipe
    from compression.sequential import compress_model

    recipe = Recipe.from_yaml(recipe_yaml)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.eval()
    tokenizer = peer.load_tokenizer(model_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    report = compress_model(model, recipe, peer.calibration_samples(calibration))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    export_checkpoint(model, tokenizer, recipe, report, out_dir)
    return {"compress_s": round(seconds, 1), "compress_cpu_s": round(cpu, 1), "recipe": recipe.describe(), "fallbacks": report.fallbacks}


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "compression"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load() -> float:
    return round(os.getloadavg()[0], 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="row names (default: every row)")
    parser.add_argument("--tools", nargs="*", default=list(TOOLS), choices=TOOLS,
                        help="run only these tools; the other tool's stored result of a row is kept")
    parser.add_argument("--work", default=str(peer.VAR / "quality"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    parser.add_argument("--table", action="store_true",
                        help="only (re)generate compression/quality_table.json from --out, then exit")
    parser.add_argument("--ours-child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-calibration", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ours_child:
        return _child_main(args.ours_child, args.child_out, args.child_calibration)
    if args.table:
        path = write_quality_table(json.loads(Path(args.out).read_text()), results_file=Path(args.out))
        print(f"wrote {path}")
        return 0
    rows = args.only or list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")

    peer.ensure_peer_venv()
    model_dir = peer.demo_dense_dir()
    split = peer.article_split(peer.load_tokenizer(model_dir), samples=args.samples, seqlen=args.seqlen)
    windows = min(split.evaluation.shape[0], args.max_windows or split.evaluation.shape[0])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    settings = {"split": split.describe(), "samples": args.samples, "seqlen": args.seqlen, "windows": windows}
    if any(results.get(k) != v for k, v in settings.items()):
        results = {"rows": {}}  # another protocol: nothing stored is comparable
    results.update({
        "machine": machine(),
        "max_windows": args.max_windows, **settings})
    results.setdefault("commands", [])
    command = "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if command not in results["commands"]:
        results["commands"].append(command)
    if results.get("dense", {}).get("windows") != windows:
        results["dense"] = {**peer.score_checkpoint(model_dir, split, max_windows=args.max_windows),
                            "load_avg": _load()}
        _write(out_path, results, args.tools)
    dense = results["dense"]["perplexity"]
    results.setdefault("rows", {})
    for row in rows:
        recipe = ROWS[row]
        entry = results["rows"].get(row) or {}
        if entry.get("recipe_yaml") != recipe:
            entry = {"recipe_yaml": recipe}
        entry["weight_bits"] = nominal_weight_bits(recipe)
        entry["preset"] = PRESET_OF_ROW.get(row)
        slug = row.replace(" ", "_").replace(":", "").replace("+", "plus").replace(",", "")
        row_split = split
        if row in CALIBRATION_CHUNKS:
            row_split = dataclasses.replace(split, calibration=split.calibration[:CALIBRATION_CHUNKS[row]])
            entry["calibration_chunks"] = CALIBRATION_CHUNKS[row]
        for tool in args.tools:
            target = work / f"{slug}-{tool}"
            shutil.rmtree(target, ignore_errors=True)
            started = {"load_avg_start": _load(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if tool == "ours":
                started["commit"] = _commit()
            try:
                if tool == "ours":
                    info = run_ours_child(row, target, row_split)
                else:
                    info = peer.run_llmcompressor(recipe, target, split=row_split, model_dir=model_dir,
                                                  dtype=PEER_DTYPE.get(row, "auto"))
                score = _score(target, split, args.max_windows, ours_loader=row in ASYMMETRIC)
                entry[tool] = {**started, **info, **score, "ratio": round(score["perplexity"] / dense, 4),
                               "load_avg_end": _load()}
            except Exception as exc:  # a row that one tool cannot run is recorded, not fatal
                entry[tool] = {**started, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            shutil.rmtree(target, ignore_errors=True)
            print(f"{row} [{tool}]: {json.dumps({k: v for k, v in entry[tool].items() if k != 'fallbacks'})[:400]}",
                  flush=True)
            results["rows"][row] = entry
            _write(out_path, results, args.tools)  # merged after every tool of every row
    print(table(results))
    return 0


def _write(out_path: Path, results: dict, own_tools) -> None:
    """Merge into the file as it is now: another run (e.g. ``--tools llmcompressor`` beside
    ``--tools ours``) may have written other rows or the other tool's results meanwhile."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists():
        on_disk = json.loads(out_path.read_text())
        if all(on_disk.get(k) == results.get(k) for k in ("split", "samples", "seqlen", "windows")):
            for row, entry in on_disk.get("rows", {}).items():
                mine = results["rows"].get(row)
                if mine is None:
                    results["rows"][row] = entry
                elif mine.get("recipe_yaml") == entry.get("recipe_yaml"):
                    for tool in TOOLS:
                        if tool not in own_tools and tool in entry:
                            mine[tool] = entry[tool]
            for command in on_disk.get("commands", []):
                if command not in results.setdefault("commands", []):
                    results["commands"].append(command)
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out_path)


def write_quality_table(results: dict, path: Path | None = None, *, results_file: Path | None = None) -> Path:
    """compression/quality_table.json: the rows the product's Recommend reads (compression.recommend),
    generated from bench/results/quality.json; rows where our engine has no number are left out."""
    from compression.recommend import TABLE_PATH

    path = path or TABLE_PATH
    rows = []
    for name, entry in results.get("rows", {}).items():
        ours, peer_ = entry.get("ours", {}), entry.get("llmcompressor", {})
        if "ratio" not in ours or name not in PRESET_OF_ROW:  # comparison-only rows are not recommended
            continue
        rows.append({"name": name, "preset": PRESET_OF_ROW.get(name), "weight_bits": entry["weight_bits"],
                     "recipe_yaml": entry["recipe_yaml"],
                     "ours_ppl": round(ours["perplexity"], 3), "ours_ratio": ours["ratio"],
                     "llmcompressor_ppl": round(peer_["perplexity"], 3) if "perplexity" in peer_ else None,
                     "llmcompressor_ratio": peer_.get("ratio")})
    results_file = (results_file or ROOT / "bench" / "results" / "quality.json").resolve()
    try:
        shown = str(results_file.relative_to(ROOT))
    except ValueError:
        shown = str(results_file)
    table = {"source": {"generated_from": f"{shown} (python bench/quality.py --table --out {shown})",
                        "results_file": shown,
                        "model": "demo: SmolLM2-135M-Instruct, bf16 dequantized from its GGUF Q4_1",
                        "metric": "WikiText-2 held-out perplexity ratio to the dense model (lower is better)",
                        "windows": results["windows"], "seqlen": results["seqlen"],
                        "calibration": f"{results['samples']} x {results['seqlen']} tokens",
                        "dense_perplexity": round(results["dense"]["perplexity"], 3),
                        "peer": "llm-compressor 0.14.0"},
             "rows": rows}
    path.write_text(json.dumps(table, indent=2) + "\n")
    return path


def _seconds(wall, cpu) -> str:
    if wall is None:
        return "—"
    return f"{wall} ({cpu})" if cpu is not None else str(wall)


def table(results: dict) -> str:
    """The markdown table for docs/benchmarks.md."""
    dense = results["dense"]["perplexity"]
    lines = [f"dense perplexity {dense:.3f} over {results['dense']['windows']} held-out windows of "
             f"{results['seqlen']} tokens", "",
             "| recipe | ours ppl | ours ratio | llm-compressor ppl | llm-compressor ratio | compress s (CPU s): ours "
             "| llm-compressor | peak RSS GB: ours | llm-compressor |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row, entry in results.get("rows", {}).items():
        cells = []
        for tool in ("ours", "llmcompressor"):
            e = entry.get(tool, {})
            cells += ([f"{e['perplexity']:.3f}", f"{e['ratio']:.4f}"] if "perplexity" in e
                      else [f"error: {e.get('error', 'not run').splitlines()[0][:70]}", "—"])
        ours, theirs = entry.get("ours", {}), entry.get("llmcompressor", {})
        times = [_seconds(ours.get("compress_s"), ours.get("compress_cpu_s")),
                 _seconds(theirs.get("oneshot_s"), theirs.get("oneshot_cpu_s")),
                 str(ours.get("peak_rss_gb", "—")), str(theirs.get("peak_rss_gb", "—"))]
        lines.append(f"| {row} | {' | '.join(cells)} | {' | '.join(times)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
