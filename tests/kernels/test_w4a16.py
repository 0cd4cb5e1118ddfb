"""W4A16 Triton GEMM against its torch reference (interpreter on CPU, real kernels on CUDA)."""
from __future__ import annotations

import pytest
import torch

from kernels.packing import pack_int4
from kernels.w4a16 import w4a16_gemm, w4a16_gemm_reference
from tests.kernels.helpers import assert_close, pack_int4_by_hand


def _case(m: int, n: int, k: int, group: int | None, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, k // group if group else 1, generator=g) * 0.02 + 0.005).to(dtype)
    return x, q, scale


@pytest.mark.parametrize("m", [1, 17, 129])
@pytest.mark.parametrize("n,k,group", [(40, 128, 32), (24, 192, 64), (56, 200, None)])
def test_triton_matches_reference(m: int, n: int, k: int, group: int | None, device: str, triton_path) -> None:
    x, q, scale = _case(m, n, k, group, torch.bfloat16, seed=m * 1000 + n)
    packed = pack_int4(q)
    ref = w4a16_gemm_reference(x, packed, scale)
    out = w4a16_gemm(x.to(device), packed.to(device), scale.to(device)).cpu()
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert_close(out, ref, rtol=1e-2, name=f"w4a16 m={m} n={n} k={k} g={group}")


def test_fp16_activations_and_the_reference_equals_dense_math(device: str, triton_path) -> None:
    x, q, scale = _case(5, 32, 64, 16, torch.float16, seed=11)
    packed = pack_int4_by_hand(q)  # the documented layout, packed independently
    dense = q.float() * scale.float().repeat_interleave(16, dim=1)
    ref = w4a16_gemm_reference(x, packed, scale)
    assert_close(ref, (x.float() @ dense.T).half(), rtol=1e-3, name="reference vs dense")
    out = w4a16_gemm(x.to(device), packed.to(device), scale.to(device)).cpu()
    assert_close(out, ref, rtol=5e-3, name="w4a16 fp16")


def test_it_rejects_mismatched_packing() -> None:
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with pytest.raises(AssertionError):
        w4a16_gemm_reference(x, torch.zeros(8, 7, dtype=torch.int32), torch.ones(8, 1))


def test_negative_full_range_scales_run_through_the_kernel(device: str, triton_path) -> None:
    """GPTQ's and AutoRound's full-range grid stores a negative scale where a group's positive side is the
    larger; the kernel multiplies by it like any other."""
    x, q, scale = _case(9, 40, 128, 32, torch.bfloat16, seed=5)
    scale = scale * torch.where(torch.rand(scale.shape, generator=torch.Generator().manual_seed(6)) < 0.5, -1, 1
                                ).to(scale.dtype)
    assert (scale < 0).any() and (scale > 0).any()
    packed = pack_int4_by_hand(q)
    dense = q.float() * scale.float().repeat_interleave(32, dim=1)
    ref = w4a16_gemm_reference(x, packed, scale)
    assert_close(ref, (x.float() @ dense.T).to(torch.bfloat16), rtol=1e-2, name="reference vs dense")
    out = w4a16_gemm(x.to(device), packed.to(device), scale.to(device)).cpu()
    assert_close(out, ref, rtol=1e-2, name="w4a16 negative scales")
