"""2:4 recovery benchmark on the demo model: one-shot vs layer-wise reconstruction vs + distillation.

    nice -n 10 python bench/recovery.py --samples 32 --windows 16 --recon-steps 8 \
        --distill-tokens 16384 --out bench/results/recovery.json

Held-out protocol of ``bench/peer.py``: WikiText-2 raw test split into whole articles, the first
articles (128 chunks × 512 tokens) are the calibration/training part, every later article is held
out and scored by perplexity on its non-overlapping 512-token windows (``--windows`` caps how many,
to fit a 2-core CPU). Pruning calibration uses the first ``--samples`` chunks of the calibration
part; distillation trains on packed chunks of the same part (never on held-out text).

Rows (each also followed by FP8_DYNAMIC and per-channel W4A16 GPTQ that keep the 2:4 zeros):
  2:4 one-shot            SparseGPT 2:4
  2:4 + reconstruction    SparseGPT 2:4 with layer-wise reconstruction (compression/algorithms/reconstruction.py)
  2:4 + recon + distill   the previous model fine-tuned against the dense teacher (compression/algorithms/distill.py)

The models are evaluated in memory (fake-quantized weights, activation fake-quant hooks), the same
forward the pipeline's exported checkpoints reproduce. Results are merged into ``--out`` row by row,
so a run with ``--only`` adds or refreshes rows.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402

log = logging.getLogger("bench.recovery")
ROWS = ("oneshot", "recon", "distill")


def _progress(event: dict) -> None:
    """compress_model's layer-end and reconstruction events → the log (a long run shows where it is)."""
    if "module" not in event and "message" in event:
        log.info("%s", event["message"])


def _ppl(model, windows) -> float:
    from bench import peer

    return peer.perplexity(model, windows)


QUANT = ("FP8_DYNAMIC", "W4A16")


def _quant_variants(model, masks, calibration, windows, row: dict, which=QUANT) -> None:
    from compression.recipe import Recipe
    from compression.sequential import compress_model

    recipes = {"FP8_DYNAMIC": lambda: Recipe.from_preset("FP8_DYNAMIC"),
               "W4A16": lambda: Recipe.from_preset("W4A16", group_size="channel")}
    for name, recipe in ((n, recipes[n]()) for n in which):
        t0 = time.perf_counter()
        quantized = copy.deepcopy(model)
        report = compress_model(quantized, recipe, calibration, held_masks=masks, progress=_progress)
        ppl = _ppl(quantized, windows)
        report.remove_activation_hooks()
        row[f"+{name}"] = {"ppl": ppl, "wall_s": round(time.perf_counter() - t0, 1)}
        log.info("%s +%s: ppl %.3f", row["name"], name, ppl)
        del quantized


def markdown(results: dict) -> str:
    """The docs/benchmarks.md table of a results file: held-out perplexity and its ratio to dense."""
    dense = results["ppl_dense"]
    lines = [f"Dense held-out perplexity: {dense:.3f}.", "",
             "| row | 2:4 (16-bit) ppl | ratio | + FP8_DYNAMIC ppl | ratio | + W4A16 (per-channel GPTQ) ppl | ratio | cost |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in results.get("rows", []):
        cells = [row["name"], f"{row['ppl']:.2f}", f"{row['ratio']:.3f}"]
        for q in ("+FP8_DYNAMIC", "+W4A16"):
            cells += [f"{row[q]['ppl']:.2f}", f"{row[q]['ratio']:.3f}"] if q in row else ["not run", ""]
        if "distill" in row:
            d = row["distill"]
            cost = f"fine-tune {d['tokens']:,} tokens, {d['steps']} steps, {d['minutes']} min"
        else:
            cost = f"compress {row.get('compress_s', 0):.0f} s"
        lines.append("| " + " | ".join(cells + [cost]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32, help="calibration chunks used for pruning (of 128)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="held-out 512-token windows scored")
    parser.add_argument("--recon-steps", type=int, default=8)
    parser.add_argument("--recon-batch", type=int, default=4)
    parser.add_argument("--recon-lr", type=float, default=1e-4)
    parser.add_argument("--recon-target", default="dense", choices=["dense", "layer"])
    parser.add_argument("--distill-tokens", type=int, default=16384)
    parser.add_argument("--distill-batch", type=int, default=2)
    parser.add_argument("--distill-seq", type=int, default=512)
    parser.add_argument("--distill-lr", type=float, default=2e-5)
    parser.add_argument("--layer-loss-weight", type=float, default=0.0)
    parser.add_argument("--only", nargs="*", choices=ROWS, default=list(ROWS))
    parser.add_argument("--quant", nargs="*", choices=QUANT, default=list(QUANT),
                        help="quantization run after each row (keeping the 2:4 zeros)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "recovery.json"))
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and exit")
    parser.add_argument("--distill-from", choices=["recon", "oneshot"], default="recon",
                        help="fine-tune the reconstructed model (default) or the one-shot pruned one")
    parser.add_argument("--dense-ppl", type=float, default=None,
                        help="the dense model's perplexity on the same windows, if already measured")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)

    from bench import peer
    from compression.algorithms.distill import FinetuneSettings, finetune
    from compression.model_io.loading import load_model
    from compression.recipe import Recipe
    from compression.sequential import compress_model, sparsity_masks

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    rows = {r["name"]: r for r in results.get("rows", [])}
    started = time.perf_counter()
    loaded = load_model("demo", allowed_roots=[])
    dense, tokenizer = loaded.model, loaded.tokenizer
    split = peer.article_split(tokenizer, samples=128, seqlen=args.seqlen)
    calibration = peer.calibration_samples(split)[: args.samples]
    windows = split.evaluation[: args.windows]
    t0 = time.perf_counter()
    ppl_dense = args.dense_ppl if args.dense_ppl is not None else _ppl(dense, windows)
    log.info("dense ppl %.3f (%.0f s)", ppl_dense, time.perf_counter() - t0)
    results.update({
        "benchmark": "recovery",
        "command": "nice -n 10 python bench/recovery.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{machine()}, torch threads {torch.get_num_threads()}",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": dt.date.today().isoformat(),
        "versions": {"torch": torch.__version__},
        "model": "SmolLM2-135M-Instruct (demo GGUF Q4_1 dequantized to fp32)",
        "protocol": {"split": split.describe() if hasattr(split, "describe") else None,
                     "calibration_samples": args.samples, "seqlen": args.seqlen,
                     "heldout_windows_scored": int(windows.shape[0]), "heldout_tokens": int(windows.numel())},
        "ppl_dense": ppl_dense,
    })
    recon = {"steps": args.recon_steps, "batch_size": args.recon_batch, "lr": args.recon_lr,
             "target": args.recon_target}

    def finish(row: dict) -> None:
        for key in ("ppl",):
            row["ratio"] = round(row[key] / ppl_dense, 4)
        for q in ("+FP8_DYNAMIC", "+W4A16"):
            if q in row:
                row[q]["ratio"] = round(row[q]["ppl"] / ppl_dense, 4)
        rows[row["name"]] = row
        order = ("2:4 one-shot", "2:4 + reconstruction", "2:4 + distillation", "2:4 + reconstruction + distillation")
        results["rows"] = [rows[n] for n in order if n in rows]
        results["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
        results["total_s"] = round(time.perf_counter() - started, 1)
        row["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")

    if "oneshot" in args.only:
        t0 = time.perf_counter()
        model = copy.deepcopy(dense)
        report = compress_model(model, Recipe.from_preset("2:4", reconstruction=False), calibration, progress=_progress)
        row = {"name": "2:4 one-shot", "compress_s": round(time.perf_counter() - t0, 1)}
        row["ppl"] = _ppl(model, windows)
        log.info("2:4 one-shot ppl %.3f", row["ppl"])
        _quant_variants(model, sparsity_masks(model, report), calibration, windows, row, args.quant)
        finish(row)
        del model

    recon_model = None
    if "distill" in args.only and args.distill_from == "oneshot":
        t0 = time.perf_counter()
        recon_model = copy.deepcopy(dense)
        report = compress_model(recon_model, Recipe.from_preset("2:4", reconstruction=False), calibration, progress=_progress)
        masks = sparsity_masks(recon_model, report)
        log.info("one-shot 2:4 for the fine-tune: %.0f s", time.perf_counter() - t0)
    if "recon" in args.only or ("distill" in args.only and args.distill_from == "recon"):
        t0 = time.perf_counter()
        recon_model = copy.deepcopy(dense)
        report = compress_model(recon_model, Recipe.from_preset("2:4", reconstruction=recon), calibration,
                                progress=_progress)
        recon_s = round(time.perf_counter() - t0, 1)
        masks = sparsity_masks(recon_model, report)
        row = {"name": "2:4 + reconstruction", "compress_s": recon_s, "reconstruction": recon,
               "layers": report.summary().get("reconstruction")}
        row["ppl"] = _ppl(recon_model, windows)
        log.info("2:4 + reconstruction ppl %.3f", row["ppl"])
        if "recon" in args.only:
            _quant_variants(recon_model, masks, calibration, windows, row, args.quant)
        finish(row)

    if "distill" in args.only:
        settings = FinetuneSettings(dataset="wikitext2 calibration articles (bench/peer.py split)",
                                    tokens=args.distill_tokens, lr=args.distill_lr, batch_size=args.distill_batch,
                                    seq_len=args.distill_seq, layer_loss_weight=args.layer_loss_weight,
                                    warmup_steps=2)
        chunks = split.calibration.reshape(-1)
        n = chunks.numel() // args.distill_seq
        train = chunks[: n * args.distill_seq].view(n, args.distill_seq)
        if n < settings.windows_needed:
            raise SystemExit(f"--distill-tokens needs {settings.windows_needed} windows; the calibration part has {n}")
        t0 = time.perf_counter()
        result = finetune(recon_model, dense, train, masks, settings)
        summary = result.summary()
        row = {"name": "2:4 + reconstruction + distillation" if args.distill_from == "recon"
               else "2:4 + distillation", "distill": {
            **{k: v for k, v in summary.items() if k != "losses"}, "lr": args.distill_lr,
            "batch_size": args.distill_batch, "seq_len": args.distill_seq,
            "minutes": round((time.perf_counter() - t0) / 60, 1)},
            "loss_curve": [[r["step"], r["loss"]] for r in summary["losses"]]}
        row["ppl"] = _ppl(recon_model, windows)
        log.info("+ distillation ppl %.3f", row["ppl"])
        _quant_variants(recon_model, masks, calibration, windows, row, args.quant)
        finish(row)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
