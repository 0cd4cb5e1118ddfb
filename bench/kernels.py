"""Check and time every kernel on a CUDA GPU; write bench/results/kernels.json (+ --e2e rows).

    python bench/kernels.py                        # kernel sweep, Llama-3.1-8B shapes, M = 1 … 4096
                                                   # → bench/results/kernels.json
    python bench/kernels.py --e2e --dense demo \\
        --checkpoint W4A16=artifacts/demo-w4a16 --checkpoint FP8_DYNAMIC=artifacts/demo-fp8 ...
                                                   # also → bench/results/e2e.json

Each op is first checked against its torch reference on the GPU (max error ≤ 2% of max |ref|),
then timed with triton.testing.do_bench (median). Ceilings are measured on the same GPU: memory
bandwidth from a 2 GiB device copy, bf16 and fp8 peaks from large torch matmuls; the roofline
fraction is achieved FLOP/s ÷ min(peak, arithmetic intensity × bandwidth).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.kernels")
SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N) of Llama-3.1-8B Linears
MS = [1, 16, 64, 256, 1024, 4096]
OPS = ["bf16", "w4a16", "fp8", "int8", "sparse24", "sparse24_int4", "sparse24_fp8"]
FP8 = torch.float8_e4m3fn


def _bench(fn: Callable[[], torch.Tensor]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure_ceilings() -> dict:
    """Measured (not datasheet) ceilings of this GPU: GB/s, bf16 and fp8 TFLOP/s."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    gbps = 2 * n / (_bench(lambda: dst.copy_(src)) * 1e-3) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * 8192 ** 3 / (_bench(lambda: a @ b) * 1e-3) / 1e12
    fp8 = None
    try:
        a8, b8 = a.to(FP8), b.to(FP8).T  # _scaled_mm wants the second operand column-major
        one = torch.ones((), device="cuda")
        fp8 = 2 * 8192 ** 3 / (_bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)) * 1e-3) / 1e12
    except (RuntimeError, AttributeError) as exc:  # pre-SM89 GPUs have no FP8 tensor cores
        log.warning("no FP8 ceiling: %s", exc)
    return {"memory_gbps": gbps, "bf16_tflops": bf16, "fp8_tflops": fp8}


def _sparse_weight(n: int, k: int) -> torch.Tensor:
    w = torch.randn(n, k, device="cuda")
    keep = w.reshape(n, k // 4, 4).abs().topk(2, dim=2).indices
    mask = torch.zeros(n, k // 4, 4, device="cuda", dtype=torch.bool).scatter_(2, keep, True)
    return w * mask.reshape(n, k)


def build_operands(k: int, n: int) -> dict:
    """Weights for every op at one (K, N), built on the GPU (random, never zeros)."""
    from kernels.packing import compress_24, pack_int4

    w = torch.randn(n, k, device="cuda") * 0.02
    scale4 = (w.reshape(n, k // 128, 128).abs().amax(dim=2) / 7.5).to(torch.bfloat16)
    codes = torch.round(w / scale4.float().repeat_interleave(128, dim=1)).clamp(-8, 7).to(torch.int8)
    s8 = w.abs().amax(dim=1, keepdim=True) / 448.0
    si8 = w.abs().amax(dim=1, keepdim=True) / 127.5
    ws = _sparse_weight(n, k) * 0.02
    s_sp8 = ws.abs().amax(dim=1, keepdim=True) / 448.0
    sp_codes = torch.round(ws / scale4.float().repeat_interleave(128, dim=1)).clamp(-8, 7).to(torch.int8)
    sp_vals, sp_meta = compress_24(ws.to(torch.bfloat16))
    sp4_vals, sp4_meta = compress_24(sp_codes)
    sp8_vals, sp8_meta = compress_24((ws / s_sp8).clamp(-448, 448).to(FP8))
    return {
        "bf16": w.to(torch.bfloat16),
        "w4a16": (pack_int4(codes), scale4),
        "fp8": ((w / s8).clamp(-448, 448).to(FP8), s8),
        "int8": (torch.round(w / si8).clamp(-128, 127).to(torch.int8), si8),
        "sparse24": (sp_vals, sp_meta),
        "sparse24_int4": (pack_int4(sp4_vals), sp4_meta, scale4),
        "sparse24_fp8": (sp8_vals, sp8_meta, s_sp8),
    }


def op_calls(op: str, x: torch.Tensor, w) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], int]:
    """(triton call, reference call, weight bytes read) for one op. W8A8 ops include activation quantization."""
    from kernels import sparse24, w4a16, w8a8

    if op == "bf16":
        return (lambda: x @ w.T), (lambda: x @ w.T), w.numel() * 2
    if op == "w4a16":
        return (lambda: w4a16.w4a16_gemm(x, *w), lambda: w4a16.w4a16_gemm_reference(x, *w),
                w[0].numel() * 4 + w[1].numel() * 2)
    if op in ("fp8", "int8"):
        return (lambda: w8a8.w8a8_linear(x, *w), lambda: w8a8.w8a8_linear_reference(x, *w),
                w[0].numel() + w[1].numel() * 4)
    if op == "sparse24":
        return (lambda: sparse24.sparse24_gemm(x, *w), lambda: sparse24.sparse24_gemm_reference(x, *w),
                w[0].numel() * 2 + w[1].numel() * 4)
    if op == "sparse24_int4":
        return (lambda: sparse24.sparse24_gemm(x, *w), lambda: sparse24.sparse24_gemm_reference(x, *w),
                w[0].numel() * 4 + w[1].numel() * 4 + w[2].numel() * 2)
    vals, meta, scale = w

    def fp8_sparse(ref: bool) -> torch.Tensor:
        quant = w8a8.quantize_per_token_reference if ref else w8a8.quantize_per_token
        gemm = sparse24.sparse24_gemm_reference if ref else sparse24.sparse24_gemm
        q, xs = quant(x)
        return gemm(q, vals, meta, scale, xs, torch.bfloat16)
    return (lambda: fp8_sparse(False)), (lambda: fp8_sparse(True)), vals.numel() + meta.numel() * 4 + scale.numel() * 4


def kernel_rows(ceilings: dict, ops: list[str], ms: list[int]) -> list[dict]:
    rows = []
    for k, n in SHAPES:
        operands = build_operands(k, n)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16_ms = None
            for op in ops:
                fast, ref, weight_bytes = op_calls(op, x, operands[op])
                out, expect = fast().float(), ref().float()
                err = (out - expect).abs().max().item() / max(expect.abs().max().item(), 1e-6)
                if not torch.isfinite(out).all() or err > 0.02:
                    raise SystemExit(f"{op} m={m} n={n} k={k}: wrong result (relative error {err:.3g})")
                ms_ = _bench(fast)
                bf16_ms = ms_ if op == "bf16" else bf16_ms
                flops = 2 * m * n * k
                moved = weight_bytes + m * k * 2 + m * n * 2
                peak = ceilings["fp8_tflops"] if "fp8" in op and ceilings["fp8_tflops"] else ceilings["bf16_tflops"]
                attainable = min(peak * 1e12, flops / moved * ceilings["memory_gbps"] * 1e9)
                rows.append({"op": op, "m": m, "n": n, "k": k, "median_ms": round(ms_, 5),
                             "tflops": round(flops / (ms_ * 1e-3) / 1e12, 3),
                             "gbps": round(moved / (ms_ * 1e-3) / 1e9, 1),
                             "speedup_vs_bf16": round(bf16_ms / ms_, 3) if bf16_ms else None,
                             "roofline_fraction": round(flops / (ms_ * 1e-3) / attainable, 3),
                             "max_rel_error": round(err, 5)})
                log.info("%-14s m=%-5d n=%-6d k=%-6d %8.4f ms  %6.1f TFLOP/s  x%.2f vs bf16", op, m, n, k, ms_,
                         rows[-1]["tflops"], rows[-1]["speedup_vs_bf16"] or 0)
            del x
        del operands
        torch.cuda.empty_cache()
    return rows


def _e2e_one(name: str, model, prompt_len: int, new_tokens: int) -> dict:
    import time

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(100, 1000, (1, prompt_len), device="cuda")
    with torch.no_grad():
        model(ids)  # warm-up (compiles / autotunes the kernels)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids)
        torch.cuda.synchronize()
        prefill = prompt_len / (time.perf_counter() - start)
        model.generate(ids[:, :8], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids[:, :8], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        decode = new_tokens / (time.perf_counter() - start)
    return {"name": name, "prefill_tok_s": round(prefill, 1), "decode_tok_s": round(decode, 2),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3),
            "prompt_tokens": prompt_len, "new_tokens": new_tokens}


def e2e_rows(dense: str, checkpoints: list[str], prompt_len: int, new_tokens: int) -> list[dict]:
    from compression.model_io.runtime import load_compressed_model

    rows = []
    if dense:
        from compression.model_io.loading import load_model

        model = load_model(dense, allowed_roots=[str(ROOT)], dtype=torch.bfloat16).model.to("cuda").eval()
        rows.append(_e2e_one("dense", model, prompt_len, new_tokens))
        del model
        torch.cuda.empty_cache()
    for spec in checkpoints:
        name, _, path = spec.partition("=")
        model = load_compressed_model(path, device="cuda", dtype=torch.bfloat16)
        rows.append(_e2e_one(name, model, prompt_len, new_tokens))
        del model
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench/results/kernels.json"))
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--e2e", action="store_true", help="also time whole models (dense vs checkpoints)")
    parser.add_argument("--dense", default="demo", help="dense model for --e2e: 'demo' or a directory")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                        help="--e2e: an exported checkpoint (repeat per preset)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("bench/kernels.py needs a CUDA GPU (none visible); nothing was measured or written.")
        return 2
    import triton

    import transformers

    ceilings = measure_ceilings()
    log.info("ceilings: %s", ceilings)
    rows = kernel_rows(ceilings, args.ops.split(","), [int(m) for m in args.ms.split(",")])
    result = {"benchmark": "kernels", "command": "python " + " ".join(["bench/kernels.py", *sys.argv[1:]]),
              "machine": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version()},
              "ceilings": ceilings, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s (%d kernel rows)", args.out, len(rows))
    if args.e2e:
        e2e = {**result, "benchmark": "e2e", "rows": e2e_rows(args.dense, args.checkpoint, args.prompt_len,
                                                               args.new_tokens)}
        e2e_out = Path(args.out).with_name("e2e.json")
        e2e_out.write_text(json.dumps(e2e, indent=2) + "\n")
        log.info("wrote %s", e2e_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
