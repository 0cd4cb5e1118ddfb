"""Data-free scale search cost: the MSE observers on the demo model's real Linears, full vs pruned.

    python bench/scale_search.py [--layers 0 15] [--repeats 1]

Times the product's search (``compression.algorithms.quant._mse_search``, what ``compute_qparams``
runs for the "mse" / "imatrix_mse" observers) with and without its pruning (an entry is scored in
full only where the error on its 32 largest weights, a lower bound, still leaves room to win), on the
seven Linears of the given decoder layers of SmolLM2-135M (the demo model as a job loads it),
single-threaded as the engine's per-module work runs on CPU. Asserts both give identical scales and
zero points. Prints JSON rows and writes bench/results/scale_search.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402

from compression.algorithms.quant import QuantArgs, _mse_search, observe  # noqa: E402

PRESET_FP8 = {"grid": 20, "maxshrink": 0.8, "patience": 1000}  # the FP8 presets' search range
SCHEMES = {
    "FP8 channel, preset range (FP8_DYNAMIC / FP8 presets)": QuantArgs(
        num_bits=8, type="float", strategy="channel", observer="mse", observer_kwargs=PRESET_FP8),
    "FP8 channel, llm-compressor's mse defaults": QuantArgs(num_bits=8, type="float", strategy="channel", observer="mse"),
    "INT8 channel asymmetric, mse": QuantArgs(num_bits=8, symmetric=False, strategy="channel", observer="mse"),
    "INT4 channel, mse": QuantArgs(num_bits=4, strategy="channel", observer="mse"),
    # groups of 64 (<= PRUNE_WIDTH) are always scored in full: this row shows the path costs nothing extra
    "INT4 group 64 asymmetric, imatrix_mse": QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=64,
                                                       observer="imatrix_mse"),
}


def demo_linears(layers: list[int]) -> dict[str, torch.Tensor]:
    from compression.model_io.loading import load_model

    model = load_model("demo").model
    return {f"layers.{i}.{name}": module.weight.detach().float().clone()
            for i in layers for name, module in model.model.layers[i].named_modules()
            if isinstance(module, torch.nn.Linear)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    weights = demo_linears(args.layers)
    torch.manual_seed(0)
    importance = {name: torch.rand(w.shape[1]) * 4 for name, w in weights.items()}  # stand-in E[x²]
    rows = []
    for scheme, qargs in SCHEMES.items():
        times: dict[str, list[float]] = {"full": [], "pruned": []}
        for _ in range(args.repeats):
            results = {}
            for label in ("full", "pruned"):
                t0 = time.perf_counter()
                results[label] = {name: _mse_search(w, qargs, torch.bfloat16, *observe(w, qargs), None,
                                                    importance[name], prune=label == "pruned")
                                  for name, w in weights.items()}
                times[label].append(time.perf_counter() - t0)
            for name in weights:
                (s_full, z_full), (s_pruned, z_pruned) = results["full"][name], results["pruned"][name]
                assert torch.equal(s_full, s_pruned) and (z_full is None or torch.equal(z_full, z_pruned)), name
        per_layer = {k: statistics.median(v) / len(args.layers) for k, v in times.items()}
        row = {"scheme": scheme, "full_s_per_layer": round(per_layer["full"], 3),
               "pruned_s_per_layer": round(per_layer["pruned"], 3),
               "speedup": round(per_layer["full"] / per_layer["pruned"], 2),
               "pruned_s_demo_model": round(30 * per_layer["pruned"], 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"benchmark": "scale_search", "command": "python bench/scale_search.py " + " ".join(sys.argv[1:]),
           "machine": machine(), "threads": 1, "layers": args.layers, "rows": rows}
    (ROOT / "bench" / "results" / "scale_search.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
