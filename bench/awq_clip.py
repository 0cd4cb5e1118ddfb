"""AWQ's weight clipping measured on real layers of the demo model, by the layer-output error.

    python bench/awq_clip.py [--samples 8] [--layers 0 5 11] [--out bench/results/awq_clip.json]

A quick proxy for the AWQ row of bench/quality.py: Hessians H = (2/n) Σ XᵀX of every Linear of a few
decoder layers of the bf16 demo model (bench/peer.py's checkpoint and calibration chunks, dense
inputs, no AWQ scaling), then each variant rounds every weight to INT4 group 64 (bf16 scales) and
is scored by ½ tr(δ H δᵀ) (δ = dequantized − original weight), summed over the Linears and as the
median per-module ratio to plain min-max round-to-nearest (what llm-compressor's QuantizationModifier
does after its AWQModifier):

- min-max: the observer's ranges;
- min-max + refit: least-squares scales with min-max's codes (``gptq.refit_scales``);
- clip: AWQ's clipping search (``awq.clip_qparams``);
- clip + refit: what the engine runs (``awq.clip_quantize``).
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gptq_variants import demo_hessians  # noqa: E402
from compression.algorithms.awq import clip_qparams, clip_quantize  # noqa: E402
from compression.algorithms.gptq import quadratic_loss, quantize_weight, refit_scales  # noqa: E402
from compression.algorithms.quant import QuantArgs, dequantize  # noqa: E402


def variants(w: torch.Tensor, h: torch.Tensor, args: QuantArgs) -> dict[str, torch.Tensor]:
    """Dequantized weights (float32) of every variant for one Linear (w in bf16)."""
    dtype = torch.bfloat16
    plain = quantize_weight(w, args, dtype)
    refit = refit_scales(w.float(), plain.codes, plain.scale, plain.zero_point, h, args)
    scale, zp = clip_qparams(w, h, args, dtype)
    clipped = quantize_weight(w, args, dtype, qparams=(scale, zp))
    return {
        "min-max": plain.weight.float(),
        "min-max + refit": dequantize(plain.codes, refit, torch.float32, args=args, zero_point=plain.zero_point),
        "clip": clipped.weight.float(),
        "clip + refit (engine)": clip_quantize(w, h, args, dtype).weight.float(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--layers", type=int, nargs="*", default=[0, 5, 11])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "awq_clip.json"))
    args = parser.parse_args(argv)
    hs = demo_hessians(args.samples, args.layers)
    results: dict[str, dict] = {}
    for label, symmetric in (("W4A16_ASYM g64", False), ("W4A16 g64", True)):
        qargs = QuantArgs(num_bits=4, type="int", strategy="group", group_size=64, symmetric=symmetric)
        t0 = time.perf_counter()
        per: dict[str, dict[str, float]] = {}
        for key, (w, h) in hs.items():
            for name, deq in variants(w.to(torch.bfloat16), h, qargs).items():
                per.setdefault(name, {})[key] = quadratic_loss(deq - w, h)
        base = per["min-max"]
        results[label] = {name: {"loss": sum(losses.values()),
                                 "median_ratio_to_minmax": round(statistics.median(
                                     losses[k] / base[k] for k in losses), 4),
                                 "max_ratio_to_minmax": round(max(losses[k] / base[k] for k in losses), 4),
                                 "modules_worse": sum(losses[k] > base[k] for k in losses),
                                 "per_module": losses} for name, losses in per.items()}
        results[label]["seconds"] = round(time.perf_counter() - t0, 1)
        for name, r in results[label].items():
            if isinstance(r, dict):
                print(f"{label}\t{name}\tloss {r['loss']:.4g}\tmedian x{r['median_ratio_to_minmax']}\t"
                      f"max x{r['max_ratio_to_minmax']}\tworse {r['modules_worse']}/{len(hs)}", flush=True)
    out = {"command": "python bench/awq_clip.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "samples": args.samples, "layers": args.layers, "modules": len(hs), "schemes": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
