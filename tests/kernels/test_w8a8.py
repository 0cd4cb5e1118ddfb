"""FP8 / INT8 activation quantization and scaled GEMM: Triton against the torch reference."""
from __future__ import annotations

import pytest
import torch

from kernels.w8a8 import (FP8_DTYPE, quantize_per_token, quantize_per_token_reference, scaled_mm,
                          scaled_mm_reference, w8a8_linear, w8a8_linear_reference)
from tests.kernels.helpers import assert_close

QDTYPES = [FP8_DTYPE, torch.int8]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("m,k", [(1, 64), (17, 100), (129, 48)])
def test_dynamic_quantization_is_bit_exact(qdtype: torch.dtype, m: int, k: int, device: str, triton_path) -> None:
    g = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m).unsqueeze(1)).to(torch.bfloat16)
    ref_q, ref_s = quantize_per_token_reference(x, None, qdtype)
    q, s = quantize_per_token(x.to(device), None, qdtype)
    assert q.dtype == qdtype and s.shape == (m, 1) and torch.isfinite(s).all()
    assert torch.equal(s.cpu(), ref_s)
    assert torch.equal(_bits(q.cpu()), _bits(ref_q))


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_static_scale_quantization_clamps_and_matches(qdtype: torch.dtype, device: str, triton_path) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(17, 80, generator=g).to(torch.float16)
    input_scale = torch.tensor([0.004])  # small on purpose: large activations saturate
    ref_q, ref_s = quantize_per_token_reference(x, input_scale, qdtype)
    q, s = quantize_per_token(x.to(device), input_scale.to(device), qdtype)
    assert s.numel() == 1 and torch.equal(_bits(q.cpu()), _bits(ref_q))
    assert (ref_q.float().abs().max() >= (448 if qdtype == FP8_DTYPE else 127))


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("m,n,k,per_channel", [(1, 40, 64, True), (17, 24, 96, False), (129, 56, 72, True)])
def test_scaled_mm_matches_reference(qdtype, m, n, k, per_channel, device: str, triton_path) -> None:
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g)
    a, a_scale = quantize_per_token_reference(x, None, qdtype)
    w_absmax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    b_scale = w_absmax / (448.0 if qdtype == FP8_DTYPE else 127.5)
    b_codes = (w / b_scale.reshape(-1, 1) if per_channel else w / b_scale)
    b = b_codes.clamp(-448, 448).to(FP8_DTYPE) if qdtype == FP8_DTYPE else b_codes.round().clamp(-128, 127).to(torch.int8)
    ref = scaled_mm_reference(a, a_scale, b, b_scale)
    out = scaled_mm(a.to(device), a_scale.to(device), b.to(device), b_scale.to(device)).cpu()
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, rtol=1e-2, name=f"scaled_mm {qdtype} m={m}")
    full = w8a8_linear(x.to(device), b.to(device), b_scale.to(device)).cpu()
    assert_close(full, w8a8_linear_reference(x, b, b_scale), rtol=1e-2, name="w8a8_linear")
    assert_close(ref, x.float() @ w.T, rtol=0.08, name="quantized vs exact")
