"""2:4 sparse GEMM over the compact form (16-bit, INT4 and FP8 values) against the torch reference."""
from __future__ import annotations

import pytest
import torch

from kernels.packing import compress_24, pack_int4
from kernels.sparse24 import sparse24_gemm, sparse24_gemm_reference
from kernels.w8a8 import FP8_DTYPE, quantize_per_token_reference
from tests.kernels.helpers import assert_close, random_24_mask

SHAPES = [(1, 40, 96), (17, 24, 128), (129, 56, 64)]


def _sparse(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, k, generator=g) * random_24_mask(n, k, g)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_values(m: int, n: int, k: int, dtype: torch.dtype, device: str, triton_path) -> None:
    g = torch.Generator().manual_seed(m + n + k)
    w = _sparse(n, k, g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    values, meta = compress_24(w)
    ref = sparse24_gemm_reference(x, values, meta)
    assert_close(ref, x.float() @ w.float().T, rtol=1e-2, name="reference vs dense")
    out = sparse24_gemm(x.to(device), values.to(device), meta.to(device)).cpu()
    assert_close(out, ref, rtol=1e-2, name=f"sparse24 16-bit m={m}")


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int4_values(m: int, n: int, k: int, device: str, triton_path) -> None:
    g = torch.Generator().manual_seed(2 * m + n)
    codes = (_sparse(n, k, g) * 3).round().clamp(-8, 7).to(torch.int8)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    values, meta = compress_24(codes)
    packed = pack_int4(values)
    ref = sparse24_gemm_reference(x, packed, meta, scale)
    dense = codes.float() * scale.float().repeat_interleave(32, dim=1)
    assert_close(ref, x.float() @ dense.T, rtol=1e-2, name="reference vs dense")
    out = sparse24_gemm(x.to(device), packed.to(device), meta.to(device), scale.to(device)).cpu()
    assert_close(out, ref, rtol=1e-2, name=f"sparse24 int4 m={m}")


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("static", [False, True])
def test_fp8_values(m: int, n: int, k: int, static: bool, device: str, triton_path) -> None:
    g = torch.Generator().manual_seed(3 * m + k)
    w = _sparse(n, k, g)
    w_scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    w8 = (w / w_scale).clamp(-448, 448).to(FP8_DTYPE)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    xq, x_scale = quantize_per_token_reference(x, torch.tensor([0.01]) if static else None)
    values, meta = compress_24(w8)
    ref = sparse24_gemm_reference(xq, values, meta, w_scale, x_scale)
    out = sparse24_gemm(xq.to(device), values.to(device), meta.to(device), w_scale.to(device),
                        x_scale.to(device)).cpu()
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, rtol=1e-2, name=f"sparse24 fp8 m={m}")
