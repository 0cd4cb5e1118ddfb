"""llm-compressor's own recipes, unchanged, through both tools (issue 13: "any recipe llm-compressor 0.14
accepts for a dense or MoE decoder model runs here").

    python bench/peer_recipes.py [--tools ours llmcompressor] [--families llama qwen3_moe]
                                 [--out bench/results/peer_recipes.json]

The recipes are not ours to copy: the script downloads llm-compressor 0.14.0's source distribution from
PyPI (``pip download --no-binary``, into ``$COMPRESSOR_BENCH_VAR/peer-recipes/``) and reads every YAML file of
its tests/ and examples/ that holds a modifier (``...Modifier:``) -- the recipes its own end-to-end,
compression and sparsity tests run -- plus, for each e2e test config that names only a ``scheme``, the recipe its
harness builds from it (``QuantizationModifier`` -- ``GPTQModifier`` with ``actorder: null`` for
``quant_type: GPTQ`` -- on ``Linear``, ignoring ``lm_head`` and ``re:.*mlp.gate[.].*``).

Each recipe runs on small random models built from transformers' config classes (``--families``: a Llama
and a Qwen3-MoE, input widths multiples of 128 so every group size and 128x128 blocks apply, the demo
tokenizer's vocabulary so the peer can save a tokenizer), calibrated on the same 16 x 64 seeded random
token sequences:

* ours: ``Recipe.from_yaml`` -> pre-flight -> ``compress_model`` -> export -> reload through our runtime;
  outcome ``ok`` (with the cosine of the compressed model's logits to the dense model's, and the largest
  difference between the in-memory and the reloaded model's logits), ``refused`` (the RecipeError's field
  and message) or ``crash``;
* llm-compressor (``--tools llmcompressor``; the peer virtualenv of bench/peer.py): ``oneshot`` on the same
  saved model and tokens (bench/peer_oneshot.py); ``ok`` or ``error`` (the exception's last line).

Writes the JSON and prints one Markdown table with both tools per recipe and family.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402
from bench.peer import VAR  # noqa: E402

PEER_SDIST = "llmcompressor==0.14.0"
FAMILIES = {
    "llama": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "head_dim": 64},
    # --families gemma3_text mixtral llama4_text: more of the class (ours only is enough to find what breaks)
    "gemma3_text": {"head_dim": 64, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "llama4_text": {"num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 512, "head_dim": 64,
                    "interleave_moe_layer_step": 1},
}
DEFAULT_FAMILIES = ["llama", "qwen3_moe"]
COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)
SAMPLES, SEQLEN = 16, 64


def peer_recipes() -> dict[str, str]:
    """{path in the sdist: YAML text} of llm-compressor's recipe files (downloaded once)."""
    folder = VAR / "peer-recipes"
    folder.mkdir(parents=True, exist_ok=True)
    archives = sorted(folder.glob("llmcompressor-*.tar.gz"))
    if not archives:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        PEER_SDIST, "-d", str(folder)], check=True)
        archives = sorted(folder.glob("llmcompressor-*.tar.gz"))
    import yaml

    recipes, schemes = {}, {}
    with tarfile.open(archives[-1]) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if (member.isfile() and member.name.endswith((".yaml", ".yml")) and len(parts) == 2
                    and parts[1].startswith(("tests/", "examples/"))):
                text = tar.extractfile(member).read().decode("utf-8")
                if "Modifier:" in text:
                    recipes[parts[1]] = text
                elif parts[1].startswith("tests/e2e/") and "\nscheme:" in "\n" + text and "\nrecipe:" not in "\n" + text:
                    config = yaml.safe_load(text) or {}
                    if isinstance(config, dict) and isinstance(config.get("scheme"), str):
                        key = (config["scheme"], config.get("quant_type") == "GPTQ")
                        schemes.setdefault(key, parts[1])
    # an e2e config naming a scheme and no recipe: the recipe its harness (tests/e2e/e2e_utils.build_recipe) builds
    for (scheme, gptq), path in sorted(schemes.items()):
        modifier = "GPTQModifier" if gptq else "QuantizationModifier"
        recipes[f"{path} (scheme {scheme}{', GPTQ' if gptq else ''})"] = (
            f"quant_stage:\n  quant_modifiers:\n    {modifier}:\n      targets: Linear\n      scheme: {scheme}\n"
            + ("      actorder: null\n" if gptq else "") + "      ignore: [lm_head, 're:.*mlp.gate[.].*']\n")
    return dict(sorted(recipes.items()))


def build(family: str, directory: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.tiny import demo_tokenizer

    if not (directory / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family]}))
        model.save_pretrained(directory, safe_serialization=True)
        demo_tokenizer().save_pretrained(directory)
    return directory


def tokens():
    import torch

    return torch.randint(3, COMMON["vocab_size"], (SAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))


def run_ours(text: str, model_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from compression.errors import RecipeError, UnsupportedModelError
    from compression.model_io.export import export_checkpoint
    from compression.model_io.runtime import load_compressed_model
    from compression.preflight import preflight
    from compression.recipe import Recipe
    from compression.sequential import compress_model

    t0 = time.perf_counter()
    ids = tokens()
    try:
        recipe = Recipe.from_yaml(text)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        preflight(model.config, recipe, samples=SAMPLES, seqlen=SEQLEN)
        with torch.no_grad():
            dense = model(ids[:2]).logits
        report = compress_model(model, recipe, [{"input_ids": row[None]} for row in ids])
        with torch.no_grad():
            ours = model(ids[:2]).logits
        with tempfile.TemporaryDirectory() as out:
            export_checkpoint(model, None, recipe, report, out)
            with torch.no_grad():
                reloaded = load_compressed_model(out)(ids[:2]).logits
        cosine = torch.nn.functional.cosine_similarity(ours.flatten(), dense.flatten(), dim=0)
        return {"outcome": "ok", "modules": len(report.modules), "cosine_to_dense": round(float(cosine), 4),
                "reload_max_diff": float((reloaded - ours).abs().max()), "notes": list(recipe.notes),
                "seconds": round(time.perf_counter() - t0, 1)}
    except (RecipeError, UnsupportedModelError) as exc:
        return {"outcome": "refused", "field": getattr(exc, "field", ""), "detail": str(exc)[:300]}
    except Exception as exc:  # noqa: BLE001 -- recorded: a crash is a bug to fix
        return {"outcome": "crash", "detail": f"{type(exc).__name__}: {exc}"[:300]}


def run_peer(text: str, model_dir: Path) -> dict:
    from bench.peer import ONESHOT_SCRIPT, ensure_peer_venv
    from safetensors.torch import save_file

    python = ensure_peer_venv()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peer-recipe-") as tmp:
        recipe, calib = Path(tmp) / "recipe.yaml", Path(tmp) / "calibration.safetensors"
        recipe.write_text(text, encoding="utf-8")
        save_file({"input_ids": tokens()}, str(calib))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)
        proc = subprocess.run([str(python), str(ONESHOT_SCRIPT), "--model", str(model_dir), "--recipe", str(recipe),
                               "--calibration", str(calib), "--out", str(Path(tmp) / "out"), "--dtype", "float32"],
                              capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return {"outcome": "ok", "seconds": round(time.perf_counter() - t0, 1)}
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    error = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
    return {"outcome": "error", "detail": error[:300]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", nargs="+", default=["ours", "llmcompressor"], choices=["ours", "llmcompressor"])
    parser.add_argument("--families", nargs="+", default=DEFAULT_FAMILIES, choices=list(FAMILIES))
    parser.add_argument("--only", nargs="+", default=None, help="recipes whose path holds one of these strings")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "peer_recipes.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    rows = {(r["recipe"], r["family"]): r for r in result.get("rows", [])}
    recipes = {k: v for k, v in peer_recipes().items() if not args.only or any(o in k for o in args.only)}
    work = VAR / "peer-recipes" / "models"
    for family in args.families:
        model_dir = build(family, work / family)
        for path, text in recipes.items():
            row = rows.setdefault((path, family), {"recipe": path, "family": family})
            for tool in args.tools:
                row[tool] = run_ours(text, model_dir) if tool == "ours" else run_peer(text, model_dir)
                print(f"{family:10s} {tool:13s} {row[tool]['outcome']:8s} {path}", file=sys.stderr, flush=True)
            result.update({"command": "python bench/peer_recipes.py " + " ".join(argv or sys.argv[1:]),
                           "source": f"{PEER_SDIST} sdist from PyPI: tests/ and examples/ YAML recipes",
                           "models": {f: {**COMMON, **FAMILIES[f]} for f in FAMILIES},
                           "calibration": f"{SAMPLES} x {SEQLEN} seeded random tokens", "machine": machine(),
                           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "rows": list(rows.values())})
            out.write_text(json.dumps(result, indent=2) + "\n")  # after every recipe: a stopped run keeps its rows
    print("| recipe (llm-compressor 0.14 sdist) | family | ours | llm-compressor |")
    print("| --- | --- | --- | --- |")
    for row in rows.values():
        cells = []
        for tool in ("ours", "llmcompressor"):
            r = row.get(tool)
            cells.append("--" if r is None else
                         f"ok (cos {r['cosine_to_dense']})" if r["outcome"] == "ok" and "cosine_to_dense" in r else
                         r["outcome"] if r["outcome"] == "ok" else f"{r['outcome']}: {r.get('field') or r['detail'][:80]}")
        print(f"| {row['recipe']} | {row['family']} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
