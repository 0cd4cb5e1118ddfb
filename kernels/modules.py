"""Compressed Linear modules: each holds only compressed buffers and its forward is one GEMM launch
(plus the activation-quantization launch for W8A8). Layouts: kernels/w4a16.py, w8a8.py, sparse24.py.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import cpu
from kernels._dispatch import use_triton
from kernels.packing import compress_24, pack_int4
from kernels.sparse24 import sparse24_gemm
from kernels.w4a16 import w4a16_gemm
from kernels.w8a8 import FP8_DTYPE, quantize_per_token, w8a8_linear


class CompressedLinear(nn.Module):
    """Shared plumbing: flatten leading dims, run :meth:`_matmul` on [M, K], add the bias.

    On the CPU (no Triton) a module keeps the cache built by ``kernels.cpu`` on its first forward
    (int4/int8 repacked for torch's CPU matmuls, or the weight dequantized once); moving or casting
    the module drops it.
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", bias)
        self._cpu_cache: dict | None = None

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): the cache would be stale
        self._cpu_cache = None
        return super()._apply(fn, recurse)

    def _use_cpu_path(self, x2d: torch.Tensor, *tensors: torch.Tensor) -> bool:
        return x2d.device.type == "cpu" and not use_triton(x2d, *tensors)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = self._matmul(x.reshape(-1, self.in_features).contiguous())
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class W4A16Linear(CompressedLinear):
    """INT4 weights (``weight_packed`` int32 [N, ceil(K/8)], ``weight_scale`` [N, K/G] or [N, 1])."""

    def __init__(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, weight_packed.shape[0], bias)
        assert weight_packed.dtype == torch.int32 and weight_packed.shape[1] == -(-in_features // 8)
        self.register_buffer("weight_packed", weight_packed.contiguous())
        self.register_buffer("weight_scale", weight_scale.contiguous())

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self._use_cpu_path(x2d, self.weight_packed):
            if self._cpu_cache is None:
                self._cpu_cache = cpu.int4_cpu_cache(self.weight_packed, self.weight_scale, self.in_features)
            return cpu.int4_cpu_mm(x2d, self._cpu_cache)
        return w4a16_gemm(x2d, self.weight_packed, self.weight_scale)


class W8A8Linear(CompressedLinear):
    """FP8 or INT8 weights [N, K] with per-channel [N, 1] / per-tensor [1] ``weight_scale``; activations
    quantized per token at run time, or with the static per-tensor ``input_scale`` when one is stored."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        assert weight.dtype in (FP8_DTYPE, torch.int8), weight.dtype
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self._use_cpu_path(x2d, self.weight):
            q, x_scale = quantize_per_token(x2d, self.input_scale, self.weight.dtype)  # as on the GPU
            x_deq = q.float() * x_scale.float().reshape(-1, 1)
            if self._cpu_cache is None:
                self._cpu_cache = (cpu.int8_cpu_cache(self.weight, self.weight_scale) if self.weight.dtype == torch.int8
                                   else {"weight": cpu.dequantized_weight(self.weight, self.weight_scale)})
            out = cpu.int8_cpu_mm(x_deq, self._cpu_cache) if "int8" in self._cpu_cache \
                else x_deq @ self._cpu_cache["weight"].T
            return out.to(x2d.dtype)
        return w8a8_linear(x2d, self.weight, self.weight_scale, self.input_scale, x2d.dtype)


class Sparse24Linear(CompressedLinear):
    """2:4 sparse weight in compact form (``values`` + 2-bit ``meta``), with 16-bit, INT4 or FP8 values."""

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, in_features: int,
                 weight_scale: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, values.shape[0], bias)
        self.register_buffer("values", values.contiguous())
        self.register_buffer("meta", meta.contiguous())
        is_fp8 = values.dtype == FP8_DTYPE
        scale = None if weight_scale is None else (weight_scale.float() if is_fp8 else weight_scale).contiguous()
        self.register_buffer("weight_scale", scale)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Sparse24Linear:
        """16-bit (or fp32) dense-with-zeros weight [N, K] → compact 2:4."""
        values, meta = compress_24(weight)
        return cls(values, meta, weight.shape[1], bias=bias)

    @classmethod
    def from_int4_codes(cls, codes: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> Sparse24Linear:
        """Signed INT4 codes int8 [N, K] (pruned entries are code 0) + their scale → compact 2:4 INT4."""
        values, meta = compress_24(codes)
        return cls(pack_int4(values), meta, codes.shape[1], weight_scale=weight_scale, bias=bias)

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> Sparse24Linear:
        """float8_e4m3fn weight [N, K] + [N, 1]/[1] scale (+ static input scale) → compact 2:4 FP8."""
        values, meta = compress_24(weight)
        return cls(values, meta, weight.shape[1], weight_scale=weight_scale, input_scale=input_scale, bias=bias)

    @property
    def value_kind(self) -> str:
        return {torch.int32: "int4", FP8_DTYPE: "fp8"}.get(self.values.dtype, "16bit")

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self._use_cpu_path(x2d, self.values):
            if self._cpu_cache is None:
                self._cpu_cache = {"weight": cpu.sparse24_dense_weight(self.values, self.meta, self.in_features,
                                                                       self.weight_scale)}
            xf = x2d.float()
            if self.values.dtype == FP8_DTYPE:
                q, x_scale = quantize_per_token(x2d, self.input_scale, FP8_DTYPE)
                xf = q.float() * x_scale.float().reshape(-1, 1)
            return (xf @ self._cpu_cache["weight"].T).to(x2d.dtype)
        if self.values.dtype == FP8_DTYPE:
            q, x_scale = quantize_per_token(x2d, self.input_scale, FP8_DTYPE)
            return sparse24_gemm(q, self.values, self.meta, self.weight_scale, x_scale, out_dtype=x2d.dtype)
        if self.values.dtype != torch.int32 and x2d.dtype != self.values.dtype:
            x2d = x2d.to(self.values.dtype)
        return sparse24_gemm(x2d, self.values, self.meta, self.weight_scale)
