"""How close can a 4-bit asymmetric group scheme come to the demo model's weights? (issue 13)

    python bench/int4_grid.py [--out bench/results/int4_grid.json]

The demo model is SmolLM2-135M-Instruct from a GGUF Q4_1 file: every Linear weight is ``d * q + m`` per
block of 32 (q in 0..15, fp16 scale d and offset m). Its bf16 dequantization (bench/peer.py's
``demo-bf16``, the weights both tools compress) therefore lies on a 4-bit grid with a *float* offset.
This script rounds every Linear weight to nearest with min-max asymmetric group scales (float32 scales;
no calibration, no GPTQ) and reports the relative Frobenius error ||Ŵ - W|| / ||W|| over all of them:

* float zero point: z = -min / s kept as a float, over the block's own min and max (GGUF Q4_1's form);
* integer zero point: z rounded to an integer, as compressed-tensors stores it (zp_dtype int8 / packed
  4-bit, the form vLLM's INT4 kernels take), over the block's min and max, and over a range that also
  holds 0 (compressed-tensors' min-max observer, what W4A16_ASYM round-to-nearest exports).

The gap between the two rows is what stops "nearly recovering" the GGUF weights in a compressed-tensors
checkpoint: with group 32 the float offset reproduces them almost exactly, the integer one cannot.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import peer  # noqa: E402


def relative_error(weights: list[torch.Tensor], group: int, integer_zero_point: bool, include_zero: bool,
                   bits: int = 4) -> float:
    levels = 2 ** bits - 1
    num = den = 0.0
    for w in weights:
        w = w.float()
        x = w.reshape(w.shape[0], -1, group)
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        if include_zero:  # compressed-tensors' min-max observer: the range always holds 0
            lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
        zero = -lo / scale
        if integer_zero_point:
            zero = zero.round()
        codes = (x / scale + zero).round().clamp(0, levels)
        num += float((((codes - zero) * scale).reshape(w.shape) - w).square().sum())
        den += float(w.square().sum())
    return (num / den) ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, nargs="*", default=[32, 64])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "int4_grid.json"))
    args = parser.parse_args()
    state: dict[str, torch.Tensor] = {}
    for path in sorted(peer.demo_dense_dir().glob("*.safetensors")):
        state.update(load_file(path))
    weights = [t for name, t in state.items() if name.endswith("proj.weight")]
    forms = {"float zero point, block min/max (GGUF Q4_1)": (False, False),
             "integer zero point, block min/max": (True, False),
             "integer zero point, range holding 0 (compressed-tensors min-max)": (True, True)}
    rows = [{"group_size": g, "form": form, "relative_error": round(relative_error(weights, g, *flags), 5)}
            for g in args.groups for form, flags in forms.items()]
    for row in rows:
        print(f"group {row['group_size']:>4}  {row['form']:<66} {row['relative_error']:.4f}")
    Path(args.out).write_text(json.dumps({"benchmark": "int4-grid", "command": "python bench/int4_grid.py",
                                          "linears": len(weights), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
