"""CPU forward of the compressed Linears (kernels/cpu.py) against the kernels' torch references."""
from __future__ import annotations

import pytest
import torch

from kernels import cpu
from kernels.modules import Sparse24Linear, W4A16Linear, W8A8Linear
from kernels.packing import pack_int4
from kernels.sparse24 import sparse24_gemm_reference
from kernels.w4a16 import w4a16_gemm_reference
from kernels.w8a8 import FP8_DTYPE, w8a8_linear_reference


def _int4(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) * 0.05 + 0.01
    return codes, scale


@pytest.mark.parametrize("n,k,group,m", [(17, 192, 64, 1), (64, 256, 32, 5), (33, 128, 128, 3), (8, 96, 96, 2)])
def test_w4a16_cpu_path_matches_the_reference(n, k, group, m):
    codes, scale = _int4(n, k, group)
    layer = W4A16Linear(pack_int4(codes), scale, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    ref = w4a16_gemm_reference(x, layer.weight_packed, layer.weight_scale)
    assert out.dtype == x.dtype and out.shape == (m, n) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    uses_torch_int4 = group in cpu.INT4_CPU_GROUPS and n % 16 == 0 and hasattr(
        torch, "_convert_weight_to_int4pack_for_cpu")
    assert ("packed" in layer._cpu_cache) == uses_torch_int4  # N=17, group 96: dequantized once instead
    cache = layer._cpu_cache
    layer(x)
    assert layer._cpu_cache is cache  # built once
    layer.to(torch.float32)
    assert layer._cpu_cache is None  # moving or casting drops it


@pytest.mark.parametrize("qdtype", [FP8_DTYPE, torch.int8])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_cpu_path_matches_the_reference(qdtype, static):
    g = torch.Generator().manual_seed(2)
    n, k = 17, 129
    w = torch.randn(n, k, generator=g)
    scale = w.abs().amax(dim=1, keepdim=True) / (448.0 if qdtype == FP8_DTYPE else 127.0)
    q = (w / scale).to(qdtype) if qdtype == FP8_DTYPE else torch.round(w / scale).clamp(-128, 127).to(torch.int8)
    input_scale = torch.tensor([0.02]) if static else None
    layer = W8A8Linear(q, scale, input_scale)
    x = torch.randn(4, k, generator=g)
    ref = w8a8_linear_reference(x, layer.weight, layer.weight_scale, layer.input_scale, x.dtype)
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    assert ("int8" in layer._cpu_cache) == (qdtype == torch.int8 and hasattr(torch, "_weight_int8pack_mm"))


def test_sparse24_cpu_path_matches_the_reference_for_16bit_int4_and_fp8_values():
    g = torch.Generator().manual_seed(3)
    n, k = 9, 64
    w = torch.randn(n, k, generator=g)
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    keep[..., 0] = keep[..., 2] = True
    w = w * keep.reshape(n, k)
    x = torch.randn(3, k, generator=g)
    dense = Sparse24Linear.from_dense(w)
    torch.testing.assert_close(dense(x), x @ w.T, rtol=1e-5, atol=1e-5)
    codes = (torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8) * keep.reshape(n, k)).to(torch.int8)
    scale = torch.rand(n, 2, generator=g) * 0.1 + 0.01
    int4 = Sparse24Linear.from_int4_codes(codes, scale)
    torch.testing.assert_close(int4(x), sparse24_gemm_reference(x, int4.values, int4.meta, int4.weight_scale),
                               rtol=1e-4, atol=1e-4)
    fp8_scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    fp8 = Sparse24Linear.from_fp8((w / fp8_scale).to(FP8_DTYPE), fp8_scale)
    from kernels.w8a8 import quantize_per_token_reference

    q, xs = quantize_per_token_reference(x, None, FP8_DTYPE)
    ref = sparse24_gemm_reference(q, fp8.values, fp8.meta, fp8.weight_scale, xs, out_dtype=torch.float32)
    torch.testing.assert_close(fp8(x), ref, rtol=1e-4, atol=1e-4)
