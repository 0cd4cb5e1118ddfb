"""Why llm-compressor's asymmetric AutoRound row scores 2.6x dense: its zero points (issue 13).

    python bench/peer_zero_points.py [--out bench/results/peer_zero_points.json]

On a small random Llama (the demo tokenizer, 2 layers, hidden 128, bf16) and 16 random 64-token
samples, the peer virtualenv (bench/peer.py) runs llm-compressor 0.14's ``oneshot`` twice with the same
``symmetric: false`` group-64 INT4 weights: once under ``AutoRoundModifier`` and once under
``GPTQModifier``. For each, the peer child records the logits of llm-compressor's own in-memory model
after ``oneshot`` (its fake-quantized forward), the zero points it holds and the integer codes its
weights need under its scales, then saves the checkpoint (``save_compressed=True``). Back here, each
checkpoint is loaded by ``compression.model_io.runtime`` (the loader the quality bench uses for
asymmetric rows) and its logits are compared with the peer's in-memory ones and the dense model's.

What it tells apart: if our loader read the peer's checkpoint wrongly, the loaded logits would differ
from the peer's in-memory ones; if the peer's quantization itself is broken, both agree and are far
from dense. Nothing here is imported by the product.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RECIPE = """
quant_stage:
  quant_modifiers:
    {modifier}:
      ignore: [lm_head]
{extra}      config_groups:
        group_0:
          targets: [Linear]
          weights: {{num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 64}}
"""
MODIFIERS = {"AutoRoundModifier": "      iters: 20\n", "GPTQModifier": ""}


def peer_child(work: Path, tokenizer_dir: str) -> None:
    """Runs in the peer virtualenv: the dense model, then one oneshot per modifier."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.Tensor.pin_memory = lambda self, *a, **k: self  # CPU-only torch (see bench/peer_oneshot.py)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "dense")
    tok.save_pretrained(work / "dense")
    ids = torch.randint(0, len(tok), (16, 64))
    test = torch.randint(0, len(tok), (2, 32))
    torch.save(test, work / "test.pt")
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 64] * 16})
    for modifier, extra in MODIFIERS.items():
        model = LlamaForCausalLM.from_pretrained(work / "dense", torch_dtype=torch.bfloat16)
        oneshot(model=model, processor=tok, dataset=ds, recipe=RECIPE.format(modifier=modifier, extra=extra),
                max_seq_length=64, num_calibration_samples=16, shuffle_calibration_samples=False)
        with torch.no_grad():
            logits = model(test).logits.float()
        zps, lo, hi = [], [], []
        for name, module in model.named_modules():
            if hasattr(module, "weight_zero_point"):
                scale = module.weight_scale.detach().float()
                zp = module.weight_zero_point.detach().float()
                codes = torch.round(module.weight.detach().float() / scale.repeat_interleave(64, 1)) \
                    + zp.repeat_interleave(64, 1)
                zps.append(zp.flatten())
                lo.append(codes.min().item())
                hi.append(codes.max().item())
        zps = torch.cat(zps)
        torch.save(logits, work / f"{modifier}-logits.pt")
        (work / f"{modifier}.json").write_text(json.dumps({
            "zero_point_min": zps.min().item(), "zero_point_max": zps.max().item(),
            "zero_points_nonzero": int((zps != 0).sum()), "zero_points": zps.numel(),
            "codes_needed_min": min(lo), "codes_needed_max": max(hi)}))
        model.save_pretrained(work / modifier, save_compressed=True)
        tok.save_pretrained(work / modifier)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "peer_zero_points.json"))
    parser.add_argument("--peer-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_child:
        peer_child(Path(args.peer_child[0]), args.peer_child[1])
        return 0

    sys.path.insert(0, str(ROOT))
    sys.path.append(str(ROOT / "bench"))
    import peer
    import torch
    from transformers import LlamaForCausalLM

    from compression.model_io.runtime import load_compressed_model
    from machine import machine

    python = peer.ensure_peer_venv()
    tokenizer_dir = peer.demo_dense_dir()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([str(python), __file__, "--peer-child", str(work), str(tokenizer_dir)], check=True)
        test = torch.load(work / "test.pt")
        dense = LlamaForCausalLM.from_pretrained(work / "dense", torch_dtype=torch.bfloat16)
        with torch.no_grad():
            reference = dense(test).logits.float()

        def rel(a, b):
            return round(float((a - b).norm() / b.norm()), 5)
        rows = {}
        for modifier in MODIFIERS:
            peer_logits = torch.load(work / f"{modifier}-logits.pt")
            loaded = load_compressed_model(work / modifier)
            loaded = loaded[0] if isinstance(loaded, tuple) else loaded
            with torch.no_grad():
                ours = loaded(test).logits.float()
            rows[modifier] = {**json.loads((work / f"{modifier}.json").read_text()),
                              "peer_in_memory_vs_dense": rel(peer_logits, reference),
                              "loaded_checkpoint_vs_dense": rel(ours, reference),
                              "loaded_checkpoint_vs_peer_in_memory": rel(ours, peer_logits)}
    result = {"started": started, "machine": machine(), "command": "python bench/peer_zero_points.py",
              "scheme": "INT4 group 64, symmetric: false; codes must lie in [-8, 7] after adding the zero point",
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
