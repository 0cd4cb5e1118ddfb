"""How long a submission waits for the demo model's config: parsing the GGUF file (what every web
worker paid on its first submit) against reading the JSON cache the first parse writes.

    python bench/submit.py            # prints a table, writes bench/results/submit.json

Each measurement runs in a fresh Python process (the in-process lru_cache would hide the cost);
the reported time is load_config('demo') alone, imports (and transformers' lazy AutoConfig set-up)
excluded.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# transformers' lazy imports (AutoConfig's first use costs seconds on its own) happen before the clock
# starts: the web process pays them once, in the start-up warm-up, whichever way the config is read.
CODE = ("import time; from compression.model_io.loading import load_config; from transformers import AutoConfig; "
        "AutoConfig.for_model('llama'); t = time.perf_counter(); load_config('demo'); print(time.perf_counter() - t)")


def one(cache_dir: str | None) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("COMPRESSOR_CONFIG_CACHE_DIR", None)
    if cache_dir:
        env["COMPRESSOR_CONFIG_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(repeats: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        parse = [one(None) for _ in range(repeats)]
        first = one(cache)  # parses the GGUF and writes the cache
        cached = [one(cache) for _ in range(repeats)]
    result = {"command": "python bench/submit.py", "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
              "gguf_parse_s": [round(x, 3) for x in parse], "first_with_cache_s": round(first, 3),
              "cached_s": [round(x, 4) for x in cached],
              "median_gguf_parse_s": round(statistics.median(parse), 3),
              "median_cached_s": round(statistics.median(cached), 4)}
    out = ROOT / "bench" / "results" / "submit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| demo config read | median s | runs |\n| --- | ---: | --- |\n"
          f"| parse the GGUF (before) | {result['median_gguf_parse_s']} | {result['gguf_parse_s']} |\n"
          f"| JSON cache (after) | {result['median_cached_s']} | {result['cached_s']} |")
    return result


if __name__ == "__main__":
    main()
