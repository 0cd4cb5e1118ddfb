"""Data-free scale search cost: the MSE observer on the demo model's Linear shapes, per layer.

    python bench/scale_search.py [--repeats 3]

Times ``compression.algorithms.quant.mse_scale`` (the pruned, exact search) against the plain loop that scores
all 16 shrink candidates on every row (the previous implementation, re-stated here), single-threaded
as the engine runs it, on random weights of SmolLM2-135M's seven Linear shapes (one decoder layer),
for FP8 per-channel (FP8_DYNAMIC / FP8 presets) and INT4 group-64. Asserts both give the same scales.
Prints JSON rows and writes bench/results/scale_search.json.
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

from compression.algorithms.quant import QuantArgs, mse_scale, mse_scale_reference  # noqa: E402

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
SCHEMES = {"FP8 channel": QuantArgs(num_bits=8, type="float", strategy="channel", observer="mse"),
           "INT4 group 64": QuantArgs(num_bits=4, strategy="group", group_size=64, observer="mse")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = {name: torch.randn(shape) * 0.02 for name, shape in SHAPES.items()}
    rows = []
    for scheme, qargs in SCHEMES.items():
        times = {"loop": [], "pruned": []}
        for _ in range(args.repeats):
            for label, fn in (("loop", mse_scale_reference), ("pruned", lambda w, a: mse_scale(w, a, torch.float32))):
                t0 = time.perf_counter()
                results = {name: fn(w, qargs) for name, w in weights.items()}
                times[label].append(time.perf_counter() - t0)
                if label == "loop":
                    reference = results
            assert all(torch.equal(results[n], reference[n]) for n in weights), "scales differ"
        row = {"scheme": scheme, "loop_s_per_layer": round(statistics.median(times["loop"]), 3),
               "pruned_s_per_layer": round(statistics.median(times["pruned"]), 3),
               "layers": 30, "pruned_s_demo_model": round(30 * statistics.median(times["pruned"]), 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"benchmark": "scale_search", "command": "python bench/scale_search.py " + " ".join(sys.argv[1:]),
           "machine": machine(), "threads": 1,
           "rows": rows}
    (ROOT / "bench" / "results" / "scale_search.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
