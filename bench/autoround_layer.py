"""AutoRound on one decoder layer of the demo model: output error against the dense layer, per setting.

    python bench/autoround_layer.py [--samples 32] [--layer 5] [--group-size 64] SPEC [SPEC ...]

SPEC is ``iters[,minmax][,minmax_lr][,full]``: e.g. ``50`` (defaults), ``50,off`` (no clip tuning),
``50,on,0.02`` (clip step 0.02, AutoRound's 1/iters at 50 steps), ``50,on,,full`` (AutoRound's full-range
symmetric grid). The layer's inputs are the dense model's own
(the first ``--layer`` layers run dense), on the quality benchmark's calibration chunks
(bench/peer.py: ``article_split``). Prints, per SPEC, the output MSE of round-to-nearest and of the
tuned layer (over every sample), their ratio, the step kept and the seconds. A tuning aid; the
model-level comparison is bench/quality.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import peer  # noqa: E402
from compression.algorithms.autoround import AutoRoundSettings, autoround_layer  # noqa: E402
from compression.algorithms.quant import QuantArgs  # noqa: E402
from compression.algorithms.reconstruction import layer_outputs  # noqa: E402
from compression.model_io.walk import capture_layer_inputs  # noqa: E402


def _settings(spec: str) -> AutoRoundSettings:
    parts = spec.split(",")
    minmax = len(parts) < 2 or parts[1] != "off"
    clip = float(parts[2]) if len(parts) > 2 and parts[2] else None
    return AutoRoundSettings(iters=int(parts[0]), enable_minmax_tuning=minmax, minmax_lr=clip,
                             full_range=len(parts) > 3 and parts[3] == "full")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("specs", nargs="+")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    model_dir = peer.demo_dense_dir()
    split = peer.article_split(peer.load_tokenizer(model_dir))
    calibration = peer.calibration_samples(split)[:args.samples]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    layers = model.model.layers
    with torch.no_grad():
        inputs = capture_layer_inputs(model, layers, calibration, "cpu")
        for i in range(args.layer):
            inputs = inputs.advanced(inputs.forward(layers[i], i))
    pairs = inputs.pairs(args.layer)
    layer = layers[args.layer]
    targets = layer_outputs(layer, pairs)
    scheme = QuantArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=args.group_size)
    for spec in args.specs:
        modules = {n: (m, scheme, None) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        started = time.perf_counter()
        _, s = autoround_layer(layer, pairs, targets, modules, _settings(spec), storage=torch.bfloat16)
        print(f"{spec}: round-to-nearest {s.error_rtn:.4g}, tuned {s.error_tuned:.4g} "
              f"(x{s.error_tuned / s.error_rtn:.3f}), step kept {s.best_iter}, "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
