"""Model families: what pre-flight costs on real-size configs, and tiny-model compression per family.

    nice -n 10 .venv/bin/python bench/families.py

1. Pre-flight (compression.preflight.preflight, W4A16 g128, ignore lm_head + routers) on the published
   configs' sizes of Llama-3-70B, Qwen3-235B-A22B and DeepSeek-V3 (built on the meta device, no
   weights): wall time, Linears targeted (every expert's gate/up/down counted), parameters, the
   device-memory estimate.
2. compress_model (W4A16 g32 GPTQ) + export on each tiny family of tests/tiny.py (2 layers, hidden
   64, 4 experts; 8 random calibration samples of 32 tokens), one thread: wall time, Linears
   compressed, expert fallbacks.

3. ``--sweep``: the class, not the examples -- tiny random models (hidden 128, 2 layers, 4 experts) of
   every causal-LM family listed in SWEEP, built by transformers' own config classes, through six
   recipes (W4A16 g32 GPTQ, FP8_DYNAMIC, AWQ + W4A16_ASYM g32, SmoothQuant + GPTQ W8A8, FP8 + KV-cache FP8,
   2:4 + FP8_DYNAMIC): compress, export, reload through our runtime. Each cell is ok (with the
   runtime's largest logit difference from the in-memory model and the logits' cosine to the dense
   model), refused (a RecipeError / UnsupportedModelError naming what is missing) or crash (any
   other exception: a bug). Only this part runs with --sweep; it is merged into families.json.

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


_S_COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
_S_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64, num_experts=4, num_local_experts=4, n_routed_experts=4)
_S_MLA = dict(kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, n_group=1,
              topk_group=1, first_k_dense_replace=1, n_shared_experts=1)
SWEEP = {  # model_type -> what its tiny config needs beyond _S_COMMON
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 32}, "gemma": {"head_dim": 32},
    "gemma2": {"head_dim": 32, "sliding_window": 4}, "gemma3_text": {"head_dim": 32, "sliding_window": 4},
    "phi3": {}, "phi": {}, "granite": {}, "cohere": {}, "cohere2": {"sliding_window": 4}, "olmo": {}, "olmo2": {},
    "olmo3": {"sliding_window": 4}, "glm": {"head_dim": 32}, "glm4": {"head_dim": 32}, "exaone4": {"sliding_window": 4},
    "smollm3": {}, "starcoder2": {}, "stablelm": {}, "helium": {"head_dim": 32}, "seed_oss": {"head_dim": 32},
    "arcee": {}, "apertus": {}, "ernie4_5": {}, "hunyuan_v1_dense": {"head_dim": 32}, "nemotron": {}, "bitnet": {},
    "gpt_neox": {}, "opt": {}, "falcon": {}, "gptj": {"rotary_dim": 16}, "mpt": {}, "bloom": {},
    "mixtral": _S_MOE, "phimoe": _S_MOE, "qwen2_moe": {**_S_MOE, "shared_expert_intermediate_size": 64},
    "qwen3_moe": {**_S_MOE, "head_dim": 32}, "olmoe": _S_MOE, "granitemoe": _S_MOE,
    "granitemoeshared": {**_S_MOE, "shared_intermediate_size": 64}, "ernie4_5_moe": _S_MOE,
    "hunyuan_v1_moe": {**_S_MOE, "head_dim": 32}, "dots1": {**_S_MOE, **_S_MLA},
    "deepseek_v2": {**_S_MOE, **_S_MLA}, "deepseek_v3": {**_S_MOE, **_S_MLA},
    "glm4_moe": {**_S_MOE, "head_dim": 32, "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1,
                 "topk_group": 1},
    "minimax": {**_S_MOE, "head_dim": 32, "layer_types": ["full_attention", "full_attention"]},
    "llama4_text": {**_S_MOE, "head_dim": 32, "intermediate_size_mlp": 256, "interleave_moe_layer_step": 1},
    "gpt_oss": {**_S_MOE, "head_dim": 32, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3_next": {**_S_MOE, "head_dim": 32, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
                   "linear_key_head_dim": 32, "linear_value_head_dim": 32, "shared_expert_intermediate_size": 64,
                   "layer_types": ["linear_attention", "full_attention"]},
    "jamba": {**_S_MOE, "attn_layer_period": 1, "attn_layer_offset": 0, "expert_layer_period": 1,
              "expert_layer_offset": 0},
}
_S_RECIPES = {
    "W4A16": "preset:W4A16",
    "FP8_DYNAMIC": "preset:FP8_DYNAMIC",
    "AWQ": """
default_stage:
  default_modifiers:
    AWQModifier: {ignore: [lm_head]}
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 32}
""",
    "SQ+W8A8": """
default_stage:
  default_modifiers:
    SmoothQuantModifier: {smoothing_strength: 0.8}
    GPTQModifier: {targets: Linear, scheme: W8A8, ignore: [lm_head]}
""",
    "FP8+KV_FP8": "preset:FP8+KV_FP8",
    "2:4+FP8_DYNAMIC": "preset:2:4+FP8_DYNAMIC",
}


def sweep_rows() -> list[dict]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from compression.errors import RecipeError, UnsupportedModelError
    from compression.model_io.export import export_checkpoint
    from compression.model_io.runtime import load_compressed_model
    from compression.recipe import Recipe
    from compression.sequential import compress_model
    from tests.engine.conftest import random_calibration

    torch.set_num_threads(1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    rows = []
    for family, extra in SWEEP.items():
        for name, text in _S_RECIPES.items():
            row = {"family": family, "recipe": name}
            try:
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**_S_COMMON, **extra})).eval()
            except Exception as exc:  # noqa: BLE001 -- this transformers cannot build it: not ours to judge
                rows.append({**row, "outcome": "not built", "detail": f"{type(exc).__name__}: {exc}"[:200]})
                break
            recipe = (Recipe.from_preset(text[7:], **({"group_size": 32} if text == "preset:W4A16" else {}))
                      if text.startswith("preset:") else Recipe.from_yaml(text))
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    dense = model(ids).logits
                report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=256))
                with torch.no_grad():
                    ours = model(ids).logits
                with tempfile.TemporaryDirectory() as out:
                    export_checkpoint(model, None, recipe, report, out)
                    with torch.no_grad():
                        theirs = load_compressed_model(out)(ids).logits
                cosine = torch.nn.functional.cosine_similarity(ours.flatten(), dense.flatten(), dim=0)
                rows.append({**row, "outcome": "ok", "linears": len(report.modules),
                             "runtime_max_diff": float((theirs - ours).abs().max()), "cosine_to_dense": round(float(cosine), 4),
                             "seconds": round(time.perf_counter() - t0, 2)})
            except (RecipeError, UnsupportedModelError) as exc:
                rows.append({**row, "outcome": "refused", "detail": str(exc)[:200]})
            except Exception as exc:  # noqa: BLE001 -- recorded: a crash is a bug to fix
                rows.append({**row, "outcome": "crash", "detail": f"{type(exc).__name__}: {exc}"[:200]})
            print(f"{family:18s} {name:16s} {rows[-1]['outcome']}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Pre-flight on real-size configs and tiny-model compression per "
                                                 "family; --sweep: every family transformers builds x six recipes.")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.sweep:
        out = ROOT / "bench" / "results" / "families.json"
        result = json.loads(out.read_text()) if out.exists() else {}
        rows = sweep_rows()
        result["sweep"] = {"command": ".venv/bin/python bench/families.py --sweep", "machine": machine(),
                           "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
        out.write_text(json.dumps(result, indent=2) + "\n")
        recipes = list(_S_RECIPES)
        print("| family | " + " | ".join(recipes) + " |")
        print("| --- |" + " --- |" * len(recipes))
        for family in SWEEP:
            cells = {r["recipe"]: r for r in rows if r["family"] == family}
            print(f"| {family} | " + " | ".join(
                (f"ok ({c['cosine_to_dense']})" if c["outcome"] == "ok" else c["outcome"]) if (c := cells.get(r)) else "--"
                for r in recipes) + " |")
        return
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    out = ROOT / "bench" / "results" / "families.json"
    result = json.loads(out.read_text()) if out.exists() else {}  # the sweep's rows stay
    result.update({"command": "nice -n 10 .venv/bin/python bench/families.py", "started": started,
                   "machine": machine(), "preflight": preflight_rows(), "families": family_rows()})
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
