"""Peak host memory of a real job against model depth, streamed and in memory (issue 12, item 1).

    python bench/memory.py [--layers 4 20] [--modes streaming in-memory] [--samples 16] [--seqlen 256]
    python bench/memory.py --family qwen3_moe --layers 4 12      # MoE: experts streamed one by one

Builds random Llamas of one width (hidden 1024, MLP 4096, 16 heads, tied embeddings, the demo
tokenizer's 49,152-token vocabulary) and 4 vs 20 decoder layers from ``LlamaConfig``, saved as
bfloat16 safetensors under var/bench-memory/. Each job (W4A16 GPTQ by default, ``--recipe FP8`` for calibrated static scales without a GPTQ sweep; built-in calibration set, no
evaluation, no speed run) runs in its own Python process through ``compression.pipeline.run_job``
with ``streaming`` forced to each mode; the child reports its own peak RSS
(VmHWM, ``bench.machine.peak_rss_bytes``: ru_maxrss would include the parent's peak) and the memory plan's pre-flight estimate of the
same path. Writes bench/results/memory.json.

``--family qwen3_moe``: random Qwen3-MoE models of the same width (32 experts of MLP 512, 2 routed per
token; 16 heads of 64), whose safetensors store the experts one by one as the Hub's do; writes
bench/results/memory-moe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "var" / "bench-memory"

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import torch
from compression.pipeline import run_job
from compression.recipe import Recipe
spec = json.loads({spec!r})
spec["recipe"] = Recipe.from_preset(spec.pop("preset")).to_dict()
torch.manual_seed(0)
started = time.monotonic()
results = run_job(spec, {out!r})
from bench.machine import peak_rss_bytes
print("RESULT " + json.dumps({{"peak_rss_bytes": peak_rss_bytes(),
                              "seconds": round(time.monotonic() - started, 1), "memory": results["memory"],
                              "compress_s": results["timings"].get("compress_s"),
                              "export_s": results["timings"].get("export_s")}}))
"""


MODELS = {
    "llama": "random Llama, hidden 1024, MLP 4096, 16 heads, vocab 49152, tied, bfloat16 safetensors",
    "qwen3_moe": ("random Qwen3-MoE, hidden 1024, 32 experts of MLP 512 (2 per token), 16 heads of 64, vocab 49152, "
                  "tied, bfloat16 safetensors (experts stored one by one)"),
}


def build_model(layers: int, family: str = "llama") -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from tests.tiny import demo_tokenizer

    path = WORK / f"{family}-h1024-l{layers}"
    if (path / "config.json").is_file():
        return path
    extra = ({} if family == "llama" else
             {"moe_intermediate_size": 512, "num_experts": 32, "num_experts_per_tok": 2, "head_dim": 64,
              "norm_topk_prob": True})
    config = AutoConfig.for_model(family, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                                  num_attention_heads=16,
                                  num_key_value_heads=16, vocab_size=49152, max_position_embeddings=2048,
                                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, **extra)
    torch.manual_seed(layers)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    demo_tokenizer().save_pretrained(path)
    return path


def run(model_dir: Path, mode: str, samples: int, seqlen: int, preset: str) -> dict:
    out = WORK / f"out-{model_dir.name}-{mode}-{os.getpid()}"
    spec = {"preset": preset, "model": str(model_dir), "allowed_roots": [str(WORK)], "device": "cpu",
            "streaming": "always" if mode == "streaming" else "never",
            "calibration": {"source": "builtin:chat-v1", "samples": samples, "seqlen": seqlen},
            "evaluation": {"tasks": [], "speed": False}}
    code = CHILD.format(repo=str(REPO), spec=json.dumps(spec), out=str(out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"job failed ({mode}, {model_dir.name}): {proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    plan = result["memory"]
    estimate = plan["streaming_bytes"] if mode == "streaming" else plan["in_memory_bytes"]
    return {"model": model_dir.name, "mode": mode, "peak_rss_mb": round(result["peak_rss_bytes"] / 1e6, 1),
            "estimate_mb": round(estimate / 1e6, 1),
            "estimate_error": round(estimate / result["peak_rss_bytes"] - 1, 3),
            "seconds": result["seconds"], "compress_s": result["compress_s"], "export_s": result["export_s"]}


def _recipe_summary(preset: str) -> str:
    sys.path.insert(0, str(REPO))
    from compression.recipe import Recipe

    return f"{preset}: " + Recipe.from_preset(preset).describe()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 20])
    parser.add_argument("--modes", nargs="+", default=["streaming", "in-memory"], choices=["streaming", "in-memory"])
    parser.add_argument("--recipe", default="W4A16", help="a preset (FP8: calibrated static scales, no GPTQ sweep)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--family", default="llama", choices=sorted(MODELS))
    parser.add_argument("--out", default=None, help="default bench/results/memory.json (memory-moe.json for an MoE)")
    args = parser.parse_args(argv)
    args.out = args.out or str(REPO / "bench" / "results" / ("memory.json" if args.family == "llama"
                                                             else "memory-moe.json"))
    sys.path.insert(0, str(REPO / "bench"))
    WORK.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows: list[dict] = []
    for mode in args.modes:
        for layers in args.layers:
            row = run(build_model(layers, args.family), mode, args.samples, args.seqlen, args.recipe)
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write(args, argv, load_before, rows)  # after every row: a stopped run keeps what it measured
    _print(rows)
    return 0


def _write(args, argv, load_before, rows) -> None:
    from machine import machine

    record = {"command": "python bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"description": machine(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
              "recipe": _recipe_summary(args.recipe), "calibration": {"source": "builtin:chat-v1",
                                                                   "samples": args.samples, "seqlen": args.seqlen},
              "model": MODELS[args.family],
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


def _print(rows: list[dict]) -> None:
    print(f"{'model':>20} {'mode':>10} {'peak RSS MB':>12} {'estimate MB':>12} {'error':>7}")
    for r in rows:
        print(f"{r['model']:>20} {r['mode']:>10} {r['peak_rss_mb']:>12} {r['estimate_mb']:>12} "
              f"{r['estimate_error']:>+7.1%}")


if __name__ == "__main__":
    sys.exit(main())
