"""Model families: what pre-flight costs on real-size configs, and tiny-model compression per family.

    nice -n 10 .venv/bin/python bench/families.py

1. Pre-flight (compression.preflight.preflight, W4A16 g128, ignore lm_head + routers) on the published
   configs' sizes of Llama-3-70B, Qwen3-235B-A22B and DeepSeek-V3 (built on the meta device, no
   weights): wall time, Linears targeted (every expert's gate/up/down counted), parameters, the
   device-memory estimate.
2. compress_model (W4A16 g32 GPTQ) + export on each tiny family of tests/tiny.py (2 layers, hidden
   64, 4 experts; 8 random calibration samples of 32 tokens), one thread: wall time, Linears
   compressed, expert fallbacks.

Writes bench/results/families.json and prints Markdown tables for docs/benchmarks.md.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402

BIG = {
    "Llama-3-70B": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)),
    "Qwen3-235B-A22B": ("qwen3_moe", dict(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                                          num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
                                          head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936)),
    "DeepSeek-V3": ("deepseek_v3", {}),  # the config class's defaults are DeepSeek-V3's sizes
}


def preflight_rows() -> list[dict]:
    import torch
    from transformers import AutoConfig

    from compression.preflight import preflight
    from compression.recipe import Recipe, pattern_time_budget

    torch.set_num_threads(1)
    rows = []
    for name, (model_type, sizes) in BIG.items():
        config = AutoConfig.for_model(model_type, **sizes)
        recipe = Recipe.from_preset("W4A16", ignore=["lm_head", "re:.*mlp.gate$"])
        t0 = time.perf_counter()
        with pattern_time_budget(1.0):  # the submission request's budget for re: patterns
            report = preflight(config, recipe, samples=128, seqlen=512, device="cuda")
        rows.append({"model": name, "seconds": round(time.perf_counter() - t0, 2),
                     "targeted_linears": report.targeted_modules, "experts": report.experts,
                     "params_b": round(report.params / 1e9, 1), "peak_device_gb": round(report.peak_device_mb / 1024, 1)})
    return rows


def family_rows() -> list[dict]:
    import torch

    from compression.model_io.export import export_checkpoint
    from compression.recipe import Recipe
    from compression.sequential import compress_model
    from tests.engine.conftest import random_calibration
    from tests.tiny import FAMILIES, tiny_family_model

    torch.set_num_threads(1)
    rows = []
    for family in FAMILIES:
        model = tiny_family_model(family)
        recipe = Recipe.from_preset("W4A16", group_size=32)
        calibration = random_calibration(n=8, length=32, vocab=256)
        t0 = time.perf_counter()
        report = compress_model(model, recipe, calibration)
        compress_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as out:
            t1 = time.perf_counter()
            export_checkpoint(model, None, recipe, report, out)
            export_s = time.perf_counter() - t1
        rows.append({"family": family, "compress_s": round(compress_s, 2), "export_s": round(export_s, 2),
                     "linears": len(report.modules), "experts": report.experts,
                     "expert_fallbacks": len(report.fallbacks)})
    return rows


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result = {"command": "nice -n 10 .venv/bin/python bench/families.py", "started": started,
              "machine": machine(),
              "preflight": preflight_rows(), "families": family_rows()}
    out = ROOT / "bench" / "results" / "families.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| model | pre-flight s | Linears targeted | experts | params (B) | device estimate (GB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in result["preflight"]:
        print(f"| {r['model']} | {r['seconds']} | {r['targeted_linears']} | {r['experts']} | {r['params_b']} | "
              f"{r['peak_device_gb']} |")
    print()
    print("| family | compress s | export s | Linears compressed | experts | expert fallbacks |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in result["families"]:
        print(f"| {r['family']} | {r['compress_s']} | {r['export_s']} | {r['linears']} | {r['experts']} | "
              f"{r['expert_fallbacks']} |")


if __name__ == "__main__":
    main()
