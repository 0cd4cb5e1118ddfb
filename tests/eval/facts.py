"""A finished job's facts, as the pipeline records them, for the card and chart tests."""
from __future__ import annotations

import copy

from compression.evaluation.lm_eval_tasks import LOCAL_TASKS


def _result(scores: dict[str, dict[str, float]], version: str = "0.4.13") -> dict:
    hib = {"acc": True, "acc_norm": True, "word_perplexity": False}
    return {
        "tasks": {task: {"source": "local", "lm_eval_task": LOCAL_TASKS[task].task, "samples": 20, "note": "",
                         "cache_hit": False,
                         "metrics": {m: {"value": v, "stderr": 0.01, "higher_is_better": hib[m]}
                                     for m, v in metrics.items()}}
                  for task, metrics in scores.items()},
        "settings": {"tasks": list(scores), "num_fewshot": None, "limit": 20, "batch_size": 4,
                     "apply_chat_template": False, "add_bos_token": None, "seed": 1234,
                     "data_source": "auto", "sources": {t: "local" for t in scores},
                     "lm_eval_tasks": {t: LOCAL_TASKS[t].task for t in scores}},
        "lm_eval_version": version, "cache_hit": False, "seconds": 12.5,
    }


BASELINE = _result({"arc_easy": {"acc": 0.5, "acc_norm": 0.45}, "piqa": {"acc": 0.8, "acc_norm": 0.7},
                    "wikitext": {"word_perplexity": 20.0}})
COMPRESSED = _result({"arc_easy": {"acc": 0.45, "acc_norm": 0.44}, "piqa": {"acc": 0.76, "acc_norm": 0.69},
                      "wikitext": {"word_perplexity": 25.0}})

RECIPE_YAML = """\
quant_stage:
  quant_modifiers:
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      dampening_frac: 0.01
      config_groups:
        group_0:
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}
"""

FACTS = {
    "model_name": "SmolLM2-135M-Instruct-W4A16",
    "model_id": "acme/SmolLM2-135M-Instruct-W4A16",
    "artifact_dir": "/srv/artifacts/job-7",
    "base_model": "demo",
    "architecture": "LlamaForCausalLM",
    "license": "apache-2.0",
    "language": ["en"],
    "developers": "Compressor user alice",
    "version": "1.0",
    "created": "2026-11-23",
    "recipe": {"quant_stage": {"quant_modifiers": {"GPTQModifier": {"targets": ["Linear"]}}}},
    "recipe_yaml": RECIPE_YAML,
    "scheme": {"preset": "W4A16", "weight_bits": 4, "weight_type": "int", "activation_bits": None,
               "granularity": "group", "group_size": 64, "symmetric": True, "sparsity": None,
               "algorithm": "GPTQ", "damping": 0.01, "targets": ["Linear"], "ignore": ["lm_head"]},
    "calibration": {"dataset": "Self-Instruct seed tasks", "hub_id": None, "samples": 64, "seq_len": 256},
    "size": {"dense_bytes": 538_000_000, "compressed_bytes": 181_234_567},
    "bits_per_param": {"dense": 16, "compressed": 4.5},
    "eval": {"baseline": BASELINE, "compressed": COMPRESSED},
    "eval_data_dir": "/work/shared/data",
    "speed": {"device": "NVIDIA H100 80GB HBM3",
              "rows": [{"name": "dense", "prefill_tok_s": 1000.0, "decode_tok_s": 50.0, "peak_mem_gb": 1.1},
                       {"name": "W4A16", "prefill_tok_s": 900.0, "decode_tok_s": 80.0, "peak_mem_gb": 0.5}]},
    "command": "python -m compression run --model demo --recipe recipe.yaml --out /srv/artifacts/job-7",
}


def facts(**changes) -> dict:
    """A deep copy of FACTS with top-level keys replaced."""
    out = copy.deepcopy(FACTS)
    out.update(changes)
    return out
