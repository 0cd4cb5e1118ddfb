"""GPTQ scale choices compared on real layers of the demo model, by the layer-output error GPTQ minimises.

    python bench/gptq_variants.py [--samples 32] [--layers 0 10 20 29] [--out bench/results/gptq_variants.json]

A quick proxy for the side-by-side perplexity (bench/quality.py), used to pick the engine's
defaults: Hessians H = (2/n) Σ XᵀX of every Linear of a few decoder layers of the bf16 demo model
(bench/peer.py's checkpoint and calibration chunks; dense inputs, fp32), then each variant
quantizes every one of those weights with ``gptq_quantize`` and is scored by the output error
½ tr(δ H δᵀ) (δ = dequantized − original weight, undamped H), summed over the Linears, and as a
ratio to the llm-compressor-equivalent variant (min-max static group scales, act-order static).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import peer  # noqa: E402
from compression.algorithms.gptq import HessianAccumulator, gptq_quantize, quadratic_loss  # noqa: E402
from compression.algorithms.quant import QuantArgs  # noqa: E402

W4 = dict(num_bits=4, type="int", strategy="group", group_size=64)
VARIANTS = {  # name -> (QuantArgs kwargs, gptq_quantize kwargs)
    "minmax, actorder static (llm-compressor 0.14 default)": (dict(W4, symmetric=True), {"actorder": "static"}),
    "minmax, no actorder": (dict(W4, symmetric=True), {"actorder": None}),
    "minmax, actorder static + least-squares scale refit": (dict(W4, symmetric=True), {"actorder": "static",
                                                                                        "refit": True}),
    "asym minmax, actorder static + least-squares scale refit": (dict(W4, symmetric=False),
                                                                 {"actorder": "static", "refit": True}),
    "full-range, actorder static": (dict(W4, symmetric=True), {"actorder": "static", "full_range": True}),
    "full-range, actorder static + least-squares scale refit (engine default)": (
        dict(W4, symmetric=True), {"actorder": "static", "refit": True, "full_range": True}),
    "mse observer, actorder static": (dict(W4, symmetric=True, observer="mse"), {"actorder": "static"}),
    "asym minmax, actorder static": (dict(W4, symmetric=False), {"actorder": "static"}),
    "asym mse observer, actorder static": (dict(W4, symmetric=False, observer="mse"), {"actorder": "static"}),
}


def hessians(model, samples, layers: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    accs: dict[str, HessianAccumulator] = {}
    handles = []
    for index in layers:
        for name, module in model.model.layers[index].named_modules():
            if isinstance(module, torch.nn.Linear):
                key = f"layers.{index}.{name}"
                accs[key] = HessianAccumulator(module.in_features)
                handles.append(module.register_forward_hook(
                    lambda mod, args, out, acc=accs[key]: acc.add(args[0].detach())))
    full = model.model.layers
    model.model.layers = full[: max(layers) + 1]  # nothing after the last measured layer is needed
    try:
        with torch.no_grad():
            for sample in samples:
                model(input_ids=sample["input_ids"])
    finally:
        model.model.layers = full
    for handle in handles:
        handle.remove()
    modules = dict(model.named_modules())
    return {k: (modules[f"model.{k}"].weight.detach().float().clone(), acc.hessian) for k, acc in accs.items()}


def demo_hessians(samples: int, layers: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`hessians` of the bf16 demo checkpoint (loaded in fp32) on its first ``samples`` calibration
    chunks (bench/peer.py's split); torch on one thread."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model_dir = peer.demo_dense_dir()
    split = peer.article_split(peer.load_tokenizer(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return hessians(model, peer.calibration_samples(split)[:samples], layers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--layers", type=int, nargs="*", default=[0, 10, 20, 29])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gptq_variants.json"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    hs = demo_hessians(args.samples, args.layers)
    print(f"hessians of {len(hs)} Linears in {time.perf_counter() - t0:.0f} s", flush=True)
    results: dict[str, dict] = {}
    for name, (qargs, kwargs) in VARIANTS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        t0 = time.perf_counter()
        per = {}
        for key, (w, h) in hs.items():
            kwargs = {"refit": False, **kwargs}
            r = gptq_quantize(w.to(torch.bfloat16), h, QuantArgs(**qargs), scale_dtype=torch.bfloat16, **kwargs)
            per[key] = quadratic_loss(r.weight.float() - w, h)
        results[name] = {"loss": sum(per.values()), "per_module": per, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}: loss {results[name]['loss']:.4f} ({results[name]['seconds']} s)", flush=True)
    base = {k: v for k, v in results.items() if "minmax" in k and "actorder static" in k}
    for name, r in results.items():
        ref = base.get("asym minmax, actorder static" if name.startswith("asym") else
                       "minmax, actorder static (llm-compressor 0.14 default)")
        if ref:
            r["ratio_to_minmax_static"] = round(r["loss"] / ref["loss"], 4)
            r["modules_better"] = sum(r["per_module"][k] < ref["per_module"][k] for k in r["per_module"])
    out = {"command": "python bench/gptq_variants.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "samples": args.samples, "layers": args.layers, "modules": len(hs), "variants": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, r in results.items():
        print(f"{r.get('ratio_to_minmax_static', '-')}\t{r.get('modules_better', '-')}/{len(hs)}\t{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
