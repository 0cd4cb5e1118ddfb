"""Model cards for compressed checkpoints, written from a finished job's recorded facts.

`build_model_card(facts)` returns README.md text: YAML front matter the Hugging Face Hub
accepts, then Model Overview, Model Optimizations, Deployment, Creation, Evaluation and
Accuracy sections. Every number comes from `facts`; a missing fact is printed as
"not recorded" (or "unknown" for the license), never guessed.

The card does not import the recipe schema: the recipe arrives as a plain dict / YAML text,
and the few properties the prose needs are passed explicitly in ``facts["scheme"]``.

`facts` shape (only ``model_name`` and ``base_model`` are required)::

    {
      "model_name": "SmolLM2-135M-Instruct-W4A16",   # title of the card
      "model_id": "org/SmolLM2-135M-Instruct-W4A16",  # where it will be published; used in
                                                      # the vLLM / lm_eval snippets (default: the
                                                      # relative path ./<model_name>; never a server path)
      "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",  # Hub id, local path or "demo"
      "baseline_note": "dequantized from its GGUF Q4_1 file" | None,  # how the baseline differs
                                                      # from the published base model
      "base_model_revision": "main" | None,
      "architecture": "LlamaForCausalLM",
      "license": "apache-2.0" | None,  "license_link": url | None,
      "language": ["en"] | None,
      "developers": "Compressor user alice" | None,
      "version": "1.0" | None,
      "created": "2026-11-23",                         # release date (ISO date string)
      "intended_use": str | None,
      "recipe": {...},                                 # the recipe as a plain dict
      "recipe_yaml": "...",                            # the same recipe as YAML text
      "scheme": {                                      # summary of the recipe for the prose
        "preset": "W4A16" | None,
        "weight_bits": 4 | None, "weight_type": "int" | "float",
        "activation_bits": 8 | None (None = activations stay 16-bit), "activation_type": "int" | "float",
        "granularity": "group" | "channel" | "tensor", "group_size": 128 | None,
        "symmetric": True | False | None,
        "full_range": True | False | None,           # symmetric integer scales on the full-range grid
        "awq_clip": True | False (AWQ recipes only),  # AWQ's clipping search chose the rounded ranges
        "activation_dynamic": True | False | None,   # dynamic per-token vs static scales
        "activation_granularity": "token" | "tensor" | None,
        "sparsity": "2:4" | None,
        "algorithm": "GPTQ" | "SparseGPT" | "round-to-nearest" | ...,
        "damping": 0.01 | None,                       # fraction of the Hessian diagonal mean
        "targets": ["Linear"], "ignore": ["lm_head"],
      },
      "calibration": {"dataset": "Self-Instruct seed tasks", "hub_id": None,
                      "samples": 128, "seq_len": 512} | None,
      "size": {"dense_bytes": int, "dense_dtype": "bfloat16", "compressed_bytes": int} | None,
                                  # the source checkpoint's weights vs the compressed safetensors
      "bits_per_param": {"dense": 16.0, "compressed": 4.25} | None,  # of the quantized Linears
      "eval": {"baseline": evaluate() result, "compressed": evaluate() result} | None,
      "speed": {"device": "NVIDIA H100", "rows": [{"name": "dense", "prefill_tok_s": ...,
                "decode_tok_s": ..., "peak_mem_gb": ...}, ...]} | None,
      "command": "python -m compression run --model M --recipe recipe.yaml --out DIR",
      "alternatives": compression.recommend.alternatives_for(recipe) | None,  # the benchmark's rows of
                                  # this recipe's bit budget: {"bits", "label", "candidates": [row],
                                  # "best": row | None, "matched_row": name | None, "source": {...}}
    }

`validate_card(text)` runs the offline part of the Hub's checks; `card_to_html(text)` renders
a card for the dashboard with front matter removed and the HTML sanitised.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import yaml

from compression.evaluation.recovery import ACCURACY, AVERAGE, PERPLEXITY, headline, recovery_table
from compression.evaluation.recovery import warnings as recovery_warnings
from compression.units import format_bytes

log = logging.getLogger(__name__)

NOT_RECORDED = "not recorded"
DEMO_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the "demo" source loads
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]{1,63}$")  # shape of the Hub's license identifiers
LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")
TASK_TITLES = {
    "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "hellaswag": "HellaSwag", "piqa": "PIQA",
    "winogrande": "WinoGrande", "boolq": "BoolQ", "lambada_openai": "LAMBADA (OpenAI)", "gsm8k": "GSM-8K",
    "wikitext": "WikiText-2", "mmlu": "MMLU", "truthfulqa_mc2": "TruthfulQA (mc2)",
}


# ----------------------------------------------------------------------------- small helpers

def _get(d: dict | None, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if not isinstance(d, dict) or d.get(key) is None:
            return default
        d = d[key]
    return d


def _or_missing(value: Any, missing: str = NOT_RECORDED) -> str:
    return missing if value in (None, "", []) else str(value)


def _base_hub_id(facts: dict) -> str | None:
    base = facts.get("base_model")
    if base == "demo":
        return DEMO_BASE
    return base if isinstance(base, str) and HUB_ID.match(base) else None


def _base_link(facts: dict) -> str:
    hub = _base_hub_id(facts)
    if hub:
        return f"[{hub}](https://huggingface.co/{hub})"
    base = facts.get("base_model")
    if isinstance(base, str) and base.startswith(("/", "~", ".")):  # a directory on the server: its name only
        return f"`{base.rstrip('/').rsplit('/', 1)[-1]}` (a local model directory)"
    return f"`{_or_missing(base)}`"


def baseline_name(facts: dict) -> str:
    """What the baseline column is: the base model, and how it was obtained when that differs from
    the published weights (the demo is dequantized from a GGUF file, not the Hub's checkpoint)."""
    name = _base_hub_id(facts) or _base_link(facts).strip("`")
    return f"{name} ({facts['baseline_note']})" if facts.get("baseline_note") else name


def _model_ref(facts: dict) -> str:
    """How a reader of the downloaded card names this model: its Hub id once pushed, else the
    relative path of the directory that holds the card and the weights."""
    return facts.get("model_id") or f"./{facts.get('model_name') or 'this-model'}"


def _fmt_bits(x: float) -> str:
    return f"{x:g}" if float(x).is_integer() else f"{x:.2f}"


def _dtype_name(bits: Any, kind: str | None) -> str | None:
    if not bits:
        return None
    return f"{'FP' if kind == 'float' else 'INT'}{bits}"


def _task_title(task: str) -> str:
    return TASK_TITLES.get(task, task)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}%"


def _score(x: float | None, higher_is_better: bool) -> str:
    if x is None:
        return "n/a"
    # accuracies as percentages like the reference cards, perplexities as they are
    return f"{x * 100:.2f}" if higher_is_better and 0.0 <= x <= 1.0 else f"{x:.3f}"


# ----------------------------------------------------------------------------- front matter

def front_matter(facts: dict) -> dict:
    """The card's YAML metadata: only fields that hold real values in the Hub's formats."""
    scheme = facts.get("scheme") or {}
    tags = ["compressed-tensors", "vllm"]
    wt = _dtype_name(scheme.get("weight_bits"), scheme.get("weight_type"))
    at = _dtype_name(scheme.get("activation_bits"), scheme.get("activation_type"))
    for dtype in (wt, at):
        if dtype and dtype.lower() not in tags:
            tags.append(dtype.lower())
    if wt:
        tags.append(f"w{scheme['weight_bits']}a{scheme.get('activation_bits') or 16}")
    if scheme.get("sparsity"):
        tags += ["sparsity", f"{str(scheme['sparsity']).replace(':', 'of')}-sparse"]
    if scheme.get("algorithm"):
        tags.append(re.sub(r"[^a-z0-9-]+", "-", str(scheme["algorithm"]).lower()).strip("-"))
    meta: dict[str, Any] = {"tags": tags, "pipeline_tag": "text-generation", "library_name": "transformers"}
    lic = facts.get("license")
    if lic and LICENSE_ID.match(str(lic)):
        meta["license"] = str(lic)
        if facts.get("license_link"):
            meta["license_link"] = facts["license_link"]
    elif lic:  # a licence that is not a Hub identifier: the Hub's "other" convention
        meta["license"] = "other"
        meta["license_name"] = re.sub(r"[^a-z0-9-]+", "-", str(lic).lower()).strip("-") or "other"
        if facts.get("license_link"):
            meta["license_link"] = facts["license_link"]
    # unknown licence: no `license` key at all (the body says "unknown")
    langs = [lang for lang in (facts.get("language") or []) if isinstance(lang, str) and LANGUAGE.match(lang)]
    if langs:
        meta["language"] = langs
    hub = _base_hub_id(facts)
    if hub:
        meta["base_model"] = hub
        meta["base_model_relation"] = "quantized"
    cal_hub = _get(facts, "calibration", "hub_id")
    if isinstance(cal_hub, str) and HUB_ID.match(cal_hub):
        meta["datasets"] = [cal_hub]
    return meta


def validate_card(text: str) -> Any:
    """Parse `text` with huggingface_hub's ModelCard and check the metadata offline.

    `ModelCard.validate()` posts the card to the Hub's /api/validate-yaml endpoint, so it
    needs the network; this runs the offline part: the front matter parses as a mapping
    (ModelCard raises otherwise) and its fields have the Hub's types and formats.
    Returns the ModelCard; raises ValueError naming the bad field.
    """
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    data = card.data.to_dict()
    if not data:
        raise ValueError("card: no YAML front matter")
    checks = {
        "tags": lambda v: isinstance(v, list) and all(isinstance(t, str) and t for t in v),
        "license": lambda v: isinstance(v, str) and bool(LICENSE_ID.match(v)),
        "language": lambda v: isinstance(v, list) and all(isinstance(x, str) and LANGUAGE.match(x) for x in v),
        "base_model": lambda v: isinstance(v, str) and bool(HUB_ID.match(v)),
        "datasets": lambda v: isinstance(v, list) and all(isinstance(x, str) and HUB_ID.match(x) for x in v),
        "pipeline_tag": lambda v: isinstance(v, str) and bool(re.fullmatch(r"[a-z0-9-]+", v)),
    }
    for key, ok in checks.items():
        if key in data and not ok(data[key]):
            raise ValueError(f"card metadata {key}: {data[key]!r} is not in the Hub's format")
    if data.get("license") == "other" and not data.get("license_name"):
        raise ValueError("card metadata license_name: required when license is 'other'")
    return card


# ----------------------------------------------------------------------------- sections

def _overview(facts: dict, rows: list[dict]) -> str:
    scheme = facts.get("scheme") or {}
    wt = _dtype_name(scheme.get("weight_bits"), scheme.get("weight_type"))
    at = _dtype_name(scheme.get("activation_bits"), scheme.get("activation_type"))
    opts = []
    if scheme.get("sparsity"):
        opts.append(f"    - **Sparsity:** {scheme['sparsity']}")
    if wt:
        opts.append(f"    - **Weight quantization:** {wt}")
    if at:
        opts.append(f"    - **Activation quantization:** {at}")
    if not opts:
        opts.append(f"    - {NOT_RECORDED}")
    lic = facts.get("license")
    lic_text = "unknown (not recorded)" if not lic else (
        f"[{lic}]({facts['license_link']})" if facts.get("license_link") else str(lic))
    lines = [
        "## Model Overview", "",
        f"- **Model Architecture:** {_or_missing(facts.get('architecture'))}",
        "- **Input:** Text", "- **Output:** Text", "- **Model Optimizations:**", *opts,
    ]
    if facts.get("intended_use"):
        lines.append(f"- **Intended Use Cases:** {facts['intended_use']}")
    lines += [
        f"- **Release Date:** {_or_missing(facts.get('created'))}",
        f"- **Version:** {_or_missing(facts.get('version'))}",
        f"- **License(s):** {lic_text}",
        f"- **Model Developers:** {_or_missing(facts.get('developers'))}",
        "", _summary_sentence(facts, rows),
    ]
    return "\n".join(lines)


def _summary_sentence(facts: dict, rows: list[dict]) -> str:
    base = f"Compressed version of {_base_link(facts)} made with Compressor."
    if facts.get("baseline_note"):
        base += (f" The baseline it is compared with is that model {facts['baseline_note']}, not the Hub's "
                 "original weights.")
    if not rows:
        return base + " Its accuracy was not compared with the base model."
    head = headline(rows)
    if head is None or head["recovery_pct"] is None:
        why = (head or {}).get("note") or "the evaluation produced no usable score"
        return base + f" Its recovery could not be computed: {why}."
    if head["kind"] == PERPLEXITY:
        return (base + f" No accuracy task was evaluated; its WikiText-2 perplexity recovery "
                f"(baseline / compressed) is {_pct(head['recovery_pct'])}.")
    avg = next(r for r in rows if r["task"] == AVERAGE)
    per_task = [f"{_task_title(r['task'])} {_pct(r['recovery_pct'])}" for r in rows
                if r["task"] != AVERAGE and r.get("primary") and r["kind"] == ACCURACY
                and r["recovery_pct"] is not None]
    text = (f"{base} Across the {avg['rows']} evaluated accuracy task(s) it keeps {_pct(avg['recovery_pct'])} "
            f"of the base model's score on average ({', '.join(per_task)})")
    if avg.get("within_noise"):
        text += "; the difference is within the evaluation's standard error"
    elif avg.get("level") == "poor":
        text += "; **this is a poor recovery: the model loses much of its quality**"
    return text + "."


def _optimizations(facts: dict) -> str:
    scheme = facts.get("scheme") or {}
    base = _base_link(facts)
    wt = _dtype_name(scheme.get("weight_bits"), scheme.get("weight_type"))
    at = _dtype_name(scheme.get("activation_bits"), scheme.get("activation_type"))
    parts: list[str] = []
    what = []
    if scheme.get("sparsity"):
        what.append(f"pruning the weights of {base} to {scheme['sparsity']} semi-structured sparsity")
    if wt:
        target = "weights and activations" if at else "weights"
        what.append(f"quantizing the {target} of {base if not what else 'the model'} to {wt}"
                    + (f" / {at}" if at and at != wt else ""))
    parts.append("This model was obtained by " + (" and ".join(what) or f"compressing {base}") + ".")

    bits = facts.get("bits_per_param") or {}
    if bits.get("dense") and bits.get("compressed"):
        parts.append(f"This lowers the storage of the compressed weights from {_fmt_bits(bits['dense'])} "
                     f"to {_fmt_bits(bits['compressed'])} bits per parameter (scales and metadata included).")
    size = facts.get("size") or {}
    dense, comp = size.get("dense_bytes"), size.get("compressed_bytes")
    if dense and comp:
        source = f"the source checkpoint ({size['dense_dtype']})" if size.get("dense_dtype") else \
            "the source checkpoint"
        parts.append(f"Its weights measure {format_bytes(comp)} on disk against {format_bytes(dense)} "
                     f"for {source}, {(1 - comp / dense) * 100:.1f}% smaller.")
    else:
        parts.append(f"Checkpoint size reduction: {NOT_RECORDED}.")

    targets = ", ".join(scheme.get("targets") or []) or NOT_RECORDED
    ignore = ", ".join(scheme.get("ignore") or [])
    parts.append(f"\nOnly the {targets} layers within the transformer blocks are compressed"
                 + (f"; these keep their original precision: {ignore}." if ignore else "."))
    if wt:
        sym = {True: "Symmetric", False: "Asymmetric"}.get(scheme.get("symmetric"), "Weight")
        gran = scheme.get("granularity")
        how = {"group": f"per-group quantization (one scale per {_or_missing(scheme.get('group_size'))} "
                        "consecutive input weights of each output row)",
               "channel": "per-channel quantization (one scale per output dimension)",
               "tensor": "per-tensor quantization (one scale for the whole matrix)"}.get(
                   gran, f"quantization with {NOT_RECORDED} granularity")
        parts.append(f"{sym} {how} maps the {wt} weights to the original floating-point values.")
        if scheme.get("awq_clip"):
            parts.append("AWQ's clipping search chose each group's range by its rounding error on the calibration "
                         "inputs (the query and key projections keep their full ranges), and the scales were then "
                         "refitted by least squares with the integer codes held fixed.")
        if scheme.get("full_range"):
            parts.append(f"The scales use the full-range grid: each group's larger side maps exactly to the lowest "
                         f"{wt} code, so a scale is negative where a group's positive side is the larger.")
    if at:
        dyn = scheme.get("activation_dynamic")
        agran = scheme.get("activation_granularity") or ("token" if dyn else "tensor")
        if dyn is None:
            parts.append(f"Activations are quantized to {at}; whether their scales are static or "
                         f"dynamic is {NOT_RECORDED}.")
        elif dyn:
            parts.append(f"Activations are quantized to {at} with dynamic per-{agran} scales computed at run time.")
        else:
            parts.append(f"Activations are quantized to {at} with static per-{agran} scales fixed "
                         "during calibration.")
    algo = scheme.get("algorithm")
    cal = facts.get("calibration") or {}
    sentence = f"The {algo} algorithm of Compressor's engine was applied" if algo else \
        f"Algorithm: {NOT_RECORDED}"
    if scheme.get("damping") is not None:
        sentence += f" with a damping factor of {scheme['damping']:g}"
    if scheme.get("autoround_iters") is not None:
        sentence += (f" ({scheme['autoround_iters']} signed-gradient steps per decoder layer tuning each weight's "
                     "rounding and each group's clipping range against the dense model's layer output)")
    if cal.get("samples"):
        sentence += (f", calibrated on {cal['samples']} sequences"
                     + (f" of up to {cal['seq_len']} tokens" if cal.get("seq_len") else "")
                     + f" from {_or_missing(cal.get('dataset'))}")
    elif cal:
        sentence += f", calibration data: {_or_missing(cal.get('dataset'))}"
    else:
        sentence += " without calibration data"
    parts.append(sentence + ".")
    return "### Model Optimizations\n\n" + " ".join(parts).replace(" \n", "\n\n")


def _ratio(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else NOT_RECORDED


def _alternatives(facts: dict) -> str:
    """Which recipes of the same bit budget the side-by-side quality benchmark measured, and why this one."""
    alt = facts.get("alternatives")
    head = "## Alternatives considered\n\n"
    if not alt:
        return head + ("No recipe of this bit budget was measured by the side-by-side quality benchmark "
                       "(bench/quality.py), so no alternative was compared.")
    src = alt.get("source") or {}
    lines = [head + f"This recipe stores about {alt['bits']:g} bits per weight in the compressed layers. "
             f"The side-by-side quality benchmark (bench/quality.py; {src.get('model', 'the demo model')}; "
             f"{src.get('metric', 'held-out perplexity ratio to dense')}, {src.get('windows', '?')} windows of "
             f"{src.get('seqlen', '?')} tokens) measured these recipes of that budget:", "",
             f"| recipe | perplexity / dense (this engine) | perplexity / dense ({src.get('peer', 'llm-compressor')}) |",
             "| --- | ---: | ---: |"]
    for row in alt.get("candidates") or []:
        mark = " (this recipe)" if row.get("name") == alt.get("matched_row") else ""
        lines.append(f"| {row.get('name')}{mark} | {_ratio(row.get('ours_ratio'))} | "
                     f"{_ratio(row.get('llmcompressor_ratio'))} |")
    best, matched = alt.get("best"), alt.get("matched_row")
    lines.append("")
    if best and matched == best.get("name"):
        why = f"Chosen: {matched}, the lowest perplexity ratio of its bit budget in the benchmark."
    elif matched:
        why = (f"Chosen: {matched}, as submitted; the benchmark's best of this budget was {best['name']} "
               f"(ratio {_ratio(best.get('ours_ratio'))}).") if best else f"Chosen: {matched}, as submitted."
    else:
        why = ("This job's recipe is not one of the benchmarked recipes; it was chosen as submitted"
               + (f". The benchmark's best of this budget was {best['name']} (ratio "
                  f"{_ratio(best.get('ours_ratio'))})." if best else "."))
    lines.append(why + " The benchmark ran on the demo model; other models can rank the recipes differently.")
    return "\n".join(lines)


def _deployment(facts: dict) -> str:
    model_ref = _model_ref(facts)
    snippet = "\n".join([
        "from vllm import LLM, SamplingParams", "",
        f'llm = LLM(model="{model_ref}")',
        "params = SamplingParams(temperature=0.0, max_tokens=128)",
        'outputs = llm.generate(["The capital of France is"], params)',
        "print(outputs[0].outputs[0].text)",
    ])
    where = ("" if facts.get("model_id") else
             f" `{model_ref}` is the directory that holds this README.md and the weights (the unpacked "
             "download; adjust the path, or use the Hub id once the model is pushed).")
    return ("## Deployment\n\nThe checkpoint uses the compressed-tensors format, which vLLM loads "
            f"directly:\n\n```python\n{snippet}\n```\n\n"
            f"`vllm serve {model_ref}` starts an OpenAI-compatible server with the same weights.{where}"
            + _vllm_check(facts.get("vllm")))


def _vllm_check(vllm: dict | None) -> str:
    """What the job itself proved about vLLM (compression.evaluation.backend), and which engine made the numbers."""
    if not vllm:
        return ""
    load = vllm.get("load") or {}
    if load.get("loaded"):
        return (f"\n\nLoaded in vLLM {load.get('vllm_version')} on {load.get('gpu')} by the compressing worker "
                "(a short greedy generation ran). The accuracy numbers below come from the compressed runtime "
                "through lm-eval's HF backend; the vLLM backend's scores are in the job's results.")
    if load.get("error"):
        return f"\n\nThe compressing worker could not load this checkpoint in vLLM: {load['error']}"
    reason = (vllm.get("backend") or {}).get("reason")
    return ("\n\nNot loaded in vLLM by the compressing worker" + (f" ({reason})" if reason else "")
            + "; the accuracy numbers below come from the compressed runtime through lm-eval's HF backend.")


def _creation(facts: dict) -> str:
    recipe_yaml = facts.get("recipe_yaml") or (
        yaml.safe_dump(facts["recipe"], sort_keys=False) if facts.get("recipe") else None)
    command = facts.get("command") or NOT_RECORDED
    out = ["## Creation", ""] + _creation_steps(facts) + [
           "This model was created with Compressor from the recipe below (saved as `recipe.yaml`):", ""]
    out += [f"```yaml\n{recipe_yaml.rstrip()}\n```" if recipe_yaml else f"Recipe: {NOT_RECORDED}.", "",
            "Command:", "", f"```bash\n{command}\n```"]
    return "\n".join(out)


def _creation_steps(facts: dict) -> list[str]:
    """The pruning, recovery and quantization steps in order, with their data and budgets
    (``facts["creation_steps"]``: one sentence each, written by the pipeline)."""
    steps = [str(s) for s in facts.get("creation_steps") or [] if s]
    if not steps:
        return []
    return ["Steps, in order:", ""] + [f"{i}. {s}" for i, s in enumerate(steps, 1)] + [""]


def _lm_eval_command(facts: dict, task: str, settings: dict, shots: int | None) -> str:
    """The public lm-eval command for one task with the job's settings (runs anywhere lm-eval is installed)."""
    args = f"pretrained={_model_ref(facts)},dtype=auto"
    if settings.get("add_bos_token"):
        args += ",add_bos_token=True"
    if settings.get("max_length"):
        args += f",max_length={settings['max_length']}"
    lines = ["lm_eval --model hf", f"  --model_args {args}", f"  --tasks {task}"]
    if shots is not None:
        lines.append(f"  --num_fewshot {shots}")
    if settings.get("limit") is not None:
        lines.append(f"  --limit {settings['limit']}")
    if settings.get("apply_chat_template"):
        lines.append("  --apply_chat_template")
    lines += [f"  --batch_size {settings.get('batch_size', 1)}", f"  --seed {settings.get('seed', 1234)}"]
    return " \\\n".join(lines)


def _evaluation(facts: dict, rows: list[dict]) -> str:
    ev = facts.get("eval") or {}
    base, comp = ev.get("baseline"), ev.get("compressed")
    if not base or not comp:
        return f"## Evaluation\n\nAccuracy evaluation: {NOT_RECORDED}.\n\n### Accuracy\n\n{NOT_RECORDED}."
    s = comp.get("settings") or {}
    if not any(task != "wikitext2_ppl" for task in comp.get("tasks") or {}):
        windows, seqlen = s.get("perplexity_windows"), s.get("perplexity_seqlen")
        return "\n".join([
            "## Evaluation", "",
            "Both models were scored by WikiText-2 perplexity (raw test split"
            + (f", the first {windows} windows of {seqlen} tokens, the same for both" if windows and seqlen else "")
            + ") with Compressor's own evaluator, the compressed model running through Compressor's kernels. "
            "No lm-evaluation-harness tasks were part of this job, so there is no accuracy score.", "",
            "### Accuracy", "", _accuracy_table(facts, rows)]).rstrip()
    sources = s.get("sources") or {}
    src_text = ", ".join(f"{_task_title(t)}: {'a local copy of the data' if v == 'local' else 'Hugging Face Hub'}"
                         for t, v in sources.items()) or NOT_RECORDED
    out = [
        "## Evaluation", "",
        f"Both models were scored with [lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness) "
        f"{_or_missing(comp.get('lm_eval_version'))} on the model objects in memory (the compressed one "
        "running through Compressor's kernels).", "",
        f"- **Tasks and data:** {src_text}",
        f"- **Few-shot:** {'task default' if s.get('num_fewshot') is None else s['num_fewshot']}",
        f"- **Limit:** {'full task' if s.get('limit') is None else str(s['limit']) + ' documents per task'}",
        f"- **Batch size:** {_or_missing(s.get('batch_size'))}; **chat template:** "
        f"{'yes' if s.get('apply_chat_template') else 'no'}; **BOS token:** "
        f"{'tokenizer default' if s.get('add_bos_token') is None else s['add_bos_token']}; "
        f"**seed:** {_or_missing(s.get('seed'))}; **context length:** "
        f"{'model maximum' if s.get('max_length') is None else str(s['max_length']) + ' tokens'}",
    ]
    notes = [f"{_task_title(t)}: {d['note']}" for t, d in comp.get("tasks", {}).items() if d.get("note")]
    if notes:
        out += ["", "Local data differs from the Hub versions as follows: " + "; ".join(notes) + "."]
    out += ["", "### Reproduction", "",
            "Scores of this model with lm-eval's public tasks and the settings above (put the base model's "
            "id after `pretrained=` for the baseline column):", ""]
    if "local" in sources.values():
        out += ["Tasks marked as a local copy were scored here on the same documents stored offline; lm-eval "
                "downloads its own copy of the public task, so small differences can remain.", ""]
    for task in sources:
        public = "wikitext" if task == "wikitext2_ppl" else task
        shots = (comp.get("tasks", {}).get(task) or {}).get("n_shot")
        out += [f"#### {_task_title(task)}", "", "```bash", _lm_eval_command(facts, public, s, shots), "```", ""]
    out += ["### Accuracy", "", _accuracy_table(facts, rows)]
    return "\n".join(out).rstrip()


def _with_se(value: float | None, se: float | None, higher_is_better: bool) -> str:
    text = _score(value, higher_is_better)
    if value is None or se is None:
        return text
    scaled = se * 100 if higher_is_better and 0.0 <= value <= 1.0 else se
    return f"{text} ± {scaled:.2f}" if higher_is_better and 0.0 <= value <= 1.0 else f"{text} ± {scaled:.3f}"


def _recovery_cell(r: dict) -> str:
    if r.get("recovery_pct") is None:
        return f"n/a ({r.get('note') or 'not computable'})"
    text = _pct(r["recovery_pct"])
    if r.get("within_noise"):
        return f"{text} (within noise)"
    if r.get("level") == "poor":
        return f"{text} ⚠ poor"
    return f"{text} (below baseline)" if r.get("level") == "warn" else text


def _accuracy_table(facts: dict, rows: list[dict]) -> str:
    if not rows:
        return f"No score was recorded for either model ({NOT_RECORDED})."
    title = facts.get("model_name", "this model")
    acc = [r for r in rows if r["task"] != AVERAGE and r["kind"] == ACCURACY]
    ppl = [r for r in rows if r["kind"] == PERPLEXITY]
    avg = next((r for r in rows if r["task"] == AVERAGE), None)
    lines = []
    if acc:
        lines += [f"| Benchmark | Shots | Documents | {baseline_name(facts)} | {title} (this model) | Recovery |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in acc:
            shots = "n/a" if r.get("n_shot") is None else str(r["n_shot"])
            lines.append(f"| {_task_title(r['task'])} ({r['metric']}) | {shots} | {_or_missing(r.get('samples'), 'n/a')} | "
                         f"{_with_se(r['baseline'], r.get('baseline_stderr'), True)} | "
                         f"{_with_se(r['compressed'], r.get('compressed_stderr'), True)} | {_recovery_cell(r)} |")
        if avg:
            lines.append(f"| **Average** ({avg['rows']} accuracy tasks, one metric each) | | | "
                         f"{_with_se(avg['baseline'], avg.get('baseline_stderr'), True)} | "
                         f"{_with_se(avg['compressed'], avg.get('compressed_stderr'), True)} | "
                         f"**{_recovery_cell(avg)}** |")
        lines += ["", "Accuracies are percentages ± lm-eval's standard error over the documents scored. A "
                  "difference is \"within noise\" when it is smaller than 1.96 × the combined standard error; "
                  "the average uses one metric per task and accuracy tasks only."]
    if ppl:
        if lines:
            lines.append("")
        lines += ["Perplexity (lower is better; recovery = baseline / compressed, never averaged with accuracies):", "",
                  f"| Benchmark | Windows / documents | {baseline_name(facts)} | {title} (this model) | Recovery |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in ppl:
            lines.append(f"| {_task_title(r['task'])} ({r['metric']}) | {_or_missing(r.get('samples'), 'n/a')} | "
                         f"{_with_se(r['baseline'], r.get('baseline_stderr'), False)} | "
                         f"{_with_se(r['compressed'], r.get('compressed_stderr'), False)} | {_recovery_cell(r)} |")
    warn = [w for w in recovery_warnings(rows)]
    if warn:
        lines += ["", "**Warnings:** " + " ".join(warn)]
    return "\n".join(lines)


def _speed(facts: dict) -> str | None:
    speed = facts.get("speed") or {}
    rows = speed.get("rows") or []
    if not rows:
        return None
    first = rows[0]
    shape = (f" Batch 1: prefill of {first['prompt_tokens']} tokens, then {first['decode_tokens']} decode steps "
             "on the KV cache; median of repeated runs.") if first.get("prompt_tokens") else ""
    lines = ["### Speed", "", f"Measured on {_or_missing(speed.get('device'))}.{shape}", "",
             "| Model | Prefill (tokens/s) | Decode (tokens/s) | Peak memory (GB) | Weights in memory (GB) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cells = [f"{r[k]:.1f}" if isinstance(r.get(k), (int, float)) else "n/a"
                 for k in ("prefill_tok_s", "decode_tok_s")]
        mem = [f"{r[k]:.2f}" if isinstance(r.get(k), (int, float)) else "n/a" for k in ("peak_mem_gb", "weights_gb")]
        lines.append(f"| {r.get('name', '?')} | {cells[0]} | {cells[1]} | {mem[0]} | {mem[1]} |")
    if speed.get("device", "").startswith("CPU"):
        lines += ["", "On a CPU, INT4 weights run through torch's CPU int4 matmul and INT8 weights through its int8 "
                      "matmul; FP8 and 2:4 weights have no CPU kernel and are dequantized once and held next to the "
                      "compressed buffers (not counted in 'weights in memory'). These numbers say nothing about GPU "
                      "speed; peak memory is measured on CUDA devices only."]
    return "\n".join(lines)


def _stage_times(facts: dict) -> str | None:
    rows = facts.get("stage_times") or []
    if not rows:
        return None
    lines = ["### Time per stage", "", "Wall time of each stage of the compression job that produced this model.", "",
             "| Stage | Seconds |", "| --- | ---: |"]
    for r in rows:
        name = "total (up to this card)" if r.get("key") == "total_s" else str(r.get("stage", "?"))
        seconds = r.get("seconds")
        lines.append(f"| {name} | {seconds:.1f} |" if isinstance(seconds, (int, float)) else f"| {name} | n/a |")
    return "\n".join(lines)


def build_model_card(facts: dict) -> str:
    """The model card (README.md text) for one finished job; see the module docstring."""
    if not facts.get("model_name") or not facts.get("base_model"):
        raise ValueError("facts: 'model_name' and 'base_model' are required")
    ev = facts.get("eval") or {}
    rows = recovery_table(ev["baseline"], ev["compressed"]) if ev.get("baseline") and ev.get("compressed") else []
    meta = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True)
    sections = [f"---\n{meta}---", f"# {facts['model_name']}", _overview(facts, rows), _optimizations(facts),
                _alternatives(facts), _deployment(facts), _creation(facts), _evaluation(facts, rows)]
    for extra in (_speed(facts), _stage_times(facts)):
        if extra:
            sections.append(extra)
    return "\n\n".join(sections).rstrip() + "\n"


def card_to_html(markdown_text: str) -> str:
    """Render a card for the dashboard: front matter removed, Markdown to HTML, then sanitised.

    nh3 keeps only harmless tags and attributes, so `<script>`, event handlers and
    `javascript:` links in the card text cannot reach the page. Images and image maps are dropped
    too: a card must not make the dashboard fetch from a server its text names.
    """
    import markdown
    import nh3

    body = re.sub(r"\A\ufeff?---\r?\n.*?\r?\n---[ \t]*(\r?\n|\Z)", "", markdown_text, count=1, flags=re.S)
    html = markdown.markdown(body, extensions=["fenced_code", "tables", "sane_lists"])
    tags = set(nh3.ALLOWED_TAGS) - {"img", "map", "area"}
    return nh3.clean(html, tags=tags, link_rel="noopener noreferrer nofollow")
