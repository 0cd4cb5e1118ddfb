"""Calibration batching: W4A16 GPTQ on the demo model, padded batches vs one sample per layer call.

    python bench/calibration_batching.py [--samples 43] [--seqlen 512] [--group-size 64] [--layers N]

The demo model (SmolLM2-135M-Instruct, the GGUF dequantized) is loaded once; each mode compresses
its own deep copy with the built-in chat calibration set (``builtin:chat-v1``: one sample per
record, nearly every one of a different length, as ``load_calibration`` yields them). Modes: one
sample per call; the CPU default (only samples of equal length share a call); padded batches with
up to 5% and up to 25% padding (25%: the accelerator default); one sample per call with the samples
in reverse order (how far the result moves when nothing but the order of float sums changes).
``--forward-rounds``: also the calibration forward passes alone, per batching setting (settings
interleaved, medians). Per mode: wall time and CPU time (``time.process_time``, all threads of this process: on a busy machine the more
meaningful of the two) of ``compress_model``, split into the solver (GPTQ per Linear, from the
progress events) and the rest (the calibration forward passes through each layer); the number of
calibration batches per layer, their pad positions; the load average. Then how far each compressed
model is from the one-sample one (integer codes that differ, largest relative weight difference).
Writes bench/results/calibration_batching.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402


def _compress(model, recipe, calibration, mode: str, batched: bool, max_padding: float | None
              ) -> tuple[dict, object]:
    import torch

    from compression.sequential import compress_model

    solver = {"wall": 0.0}

    def progress(event: dict) -> None:
        if "module" in event:
            solver["wall"] += float(event.get("seconds", 0.0))

    load = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    report = compress_model(model, recipe, calibration, progress=progress, batch_calibration=batched,
                            max_padding=max_padding)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    row = {"mode": mode, "batching": report.batching,
           "layer_batches": report.layer_batches, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "solver_wall_s": round(solver["wall"], 1), "rest_wall_s": round(wall - solver["wall"], 1),
           "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2),
           "threads": torch.get_num_threads()}
    return row, report


def forward_rounds(model, calibration, rounds: int) -> list[dict]:
    """CPU and wall seconds of the calibration forward passes alone (the dense model, every decoder
    layer once, no hooks) per batching setting; settings interleaved, ``rounds`` times, medians."""
    import statistics

    import torch

    from compression.model_io.walk import capture_layer_inputs, decoder_layers

    _, layers = decoder_layers(model)
    settings = [("one sample per call", False, 0, 0.0), ("padded, <= 5%, 1024 tokens", True, 1024, 0.05),
                ("padded, <= 5%, 4096 tokens", True, 4096, 0.05), ("padded, <= 25%, 1024 tokens", True, 1024, 0.25),
                ("padded, <= 25%, 4096 tokens", True, 4096, 0.25)]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in settings}
    calls: dict[str, int] = {}
    with torch.no_grad():
        for _ in range(rounds):
            for name, padding, batch_tokens, max_padding in settings:
                c0, t0 = time.process_time(), time.perf_counter()
                inputs = capture_layer_inputs(model, layers, calibration, "cpu", padding=padding,
                                              batch_tokens=batch_tokens, max_padding=max_padding)
                for index, layer in enumerate(layers):
                    inputs = inputs.advanced(inputs.forward(layer, index))
                times[name].append((time.process_time() - c0, time.perf_counter() - t0))
                calls[name] = len(inputs.batches())
    return [{"setting": name, "calls_per_layer": calls[name],
             "cpu_s": round(statistics.median(c for c, _ in times[name]), 2),
             "wall_s": round(statistics.median(w for _, w in times[name]), 2)} for name, *_ in settings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=43)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=0, help="compress only the first N decoder layers (0: all)")
    parser.add_argument("--forward-rounds", type=int, default=3,
                        help="rounds of the forward-only comparison (0: skip it)")
    parser.add_argument("--skip-compress", action="store_true", help="only the forward-only comparison")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration_batching.json"))
    args = parser.parse_args()

    import torch

    from compression.calibration import load_calibration
    from compression.model_io.loading import load_model
    from compression.model_io.walk import decoder_layers
    from compression.recipe import Recipe

    torch.set_num_threads(args.threads)
    loaded = load_model("demo", allowed_roots=[])
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.layers:
        _, layers = decoder_layers(model)
        del layers[args.layers:]
        model.config.num_hidden_layers = args.layers
    calibration = load_calibration("builtin:chat-v1", tokenizer, samples=args.samples, seqlen=args.seqlen,
                                   data_dir="")
    lengths = sorted(int(s["input_ids"].shape[1]) for s in calibration)
    recipe = Recipe.from_preset("W4A16", group_size=args.group_size)
    from compression.model_io.walk import BATCH_TOKENS, MAX_PADDING, padded_groups

    modes = [("one sample per call", calibration, False, None),
             ("default on a CPU (equal lengths share a call)", calibration, True, None),
             ("padded, <= 5% padding", calibration, True, 0.05),
             (f"padded, <= {MAX_PADDING:.0%} padding", calibration, True, MAX_PADDING),
             ("one sample per call, reverse order", calibration[::-1], False, None)]
    rows, reference = [], None
    for mode, samples, batched, max_padding in ([] if args.skip_compress else modes):
        copy_ = copy.deepcopy(model)
        row, report = _compress(copy_, recipe, samples, mode, batched, max_padding)
        if max_padding is not None:
            groups = padded_groups([int(s["input_ids"].shape[1]) for s in samples], BATCH_TOKENS, max_padding)
            row["pad_positions"] = sum(len(g) * max(int(samples[i]["input_ids"].shape[1]) for i in g)
                                       for g in groups) - sum(lengths)
        with torch.no_grad():
            weights = {n: p.detach().clone() for n, p in copy_.named_parameters() if ".layers." in n}
        if reference is None:
            reference = (report, weights)
        else:
            flipped = sum(int((rec.codes != reference[0].modules[name].codes).sum())
                          for name, rec in report.modules.items())
            row["codes_differing"] = flipped
            row["codes_differing_fraction"] = round(flipped / sum(r.codes.numel() for r in report.modules.values()), 5)
            row["max_relative_weight_difference"] = round(max(
                float((w - reference[1][n]).norm() / reference[1][n].norm()) for n, w in weights.items()), 5)
        del copy_
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"), "machine": machine(),
              "model": "demo (SmolLM2-135M-Instruct, GGUF dequantized)", "dtype": str(next(model.parameters()).dtype),
              "layers": len(decoder_layers(model)[1]), "recipe": f"W4A16 group {args.group_size} GPTQ",
              "calibration": "builtin:chat-v1", "samples": len(calibration), "tokens": sum(lengths),
              "lengths": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
              "distinct_lengths": len(set(lengths)), "rows": rows}
    if args.forward_rounds:
        result["load_before_forward"] = round(os.getloadavg()[0], 2)
        result["forward_only"] = forward_rounds(model, calibration, args.forward_rounds)
        result["load_after_forward"] = round(os.getloadavg()[0], 2)
        for row in result["forward_only"]:
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "forward_only")}, indent=2))
    print("| mode | calls / layer pass | pad positions | wall s | CPU s | GPTQ solver wall s | rest wall s "
          "| codes ≠ one-sample | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        differing = f"{r['codes_differing_fraction']:.2%}" if "codes_differing" in r else "—"
        print(f"| {r['mode']} | {r['layer_batches']} | {r.get('pad_positions', 0)} | {r['wall_s']} | {r['cpu_s']} | "
              f"{r['solver_wall_s']} | {r['rest_wall_s']} | {differing} | {r['load_start']}-{r['load_end']} |")


if __name__ == "__main__":
    main()
