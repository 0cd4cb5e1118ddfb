"""One llm-compressor ``oneshot`` run, executed by the peer virtualenv's python (see bench/peer.py).

    VAR/peer-llmcompressor/bin/python bench/peer_oneshot.py --model DIR --recipe R.yaml \
        --calibration CALIB.safetensors --out DIR [--dtype auto|bfloat16|float32] [--threads N]

CALIB.safetensors holds ``input_ids`` LongTensor [samples, seqlen] (every token real, so the
attention mask is all ones). Loads the model, runs oneshot on exactly those chunks, saves the
compressed checkpoint (``save_compressed=True``) and the tokenizer, and prints one JSON line:
{"wall_s", "load_s", "oneshot_s", "save_s", "peak_rss_gb", "versions"}. Never imports the product.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from machine import peak_rss_bytes  # noqa: E402  (bench/machine.py: this script's own directory is on sys.path)
from importlib.metadata import version  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its activation cache (pipelines/cache.py), which a CPU-only torch
        # refuses ("Cannot access accelerator device"); pinning only speeds up host→GPU copies, so
        # without a GPU the tensor itself is the same thing. Nothing else in oneshot changes.
        torch.Tensor.pin_memory = lambda self, *a, **k: self
    ids = load_file(args.calibration)["input_ids"]
    samples, seqlen = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seqlen] * samples})

    t0 = time.perf_counter()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, dataset=dataset, recipe=args.recipe, max_seq_length=seqlen,
            num_calibration_samples=samples, shuffle_calibration_samples=False)
    oneshot_s, oneshot_cpu = time.perf_counter() - t0, time.process_time() - c0

    t0 = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    save_s = time.perf_counter() - t0
    print(json.dumps({
        "wall_s": round(time.perf_counter() - STARTED, 2), "load_s": round(load_s, 2),
        "oneshot_s": round(oneshot_s, 2), "save_s": round(save_s, 2),
        "peak_rss_gb": round(peak_rss_bytes() / 2 ** 30, 3),  # VmHWM: not inherited from the parent
        "cpu_s": round(time.process_time(), 1), "oneshot_cpu_s": round(oneshot_cpu, 1),
        "dtype": str(next(model.parameters()).dtype),
        "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
    }))


if __name__ == "__main__":
    main()
