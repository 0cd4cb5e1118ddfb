"""Quantization arithmetic as pure functions (compressed-tensors conventions, reference doc §2.4).

Every quantizer comes as a pair ``quantize_*`` / ``dequantize_*`` that asserts its own
preconditions. Weights are ``[out, in]``; a scale is ``[1]`` (tensor), ``[out, 1]`` (channel),
``[out, in // group_size]`` (group, and NVFP4's tensor_group) or ``[ceil(out / bo), ceil(in / bi)]``
(block). Asymmetric integer schemes carry an int8 zero point shaped like the scale
(``q = clamp(round(w / s) + zp)``, ``w ≈ (q - zp) · s``); NVFP4 (FP4 E2M1 values, FP8 group scales)
carries a float32 global scale ``g`` and dequantizes as ``q · (s / g)`` like compressed-tensors.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 E2M1 magnitudes by 3-bit code
STRATEGIES = ("tensor", "channel", "group", "block", "tensor_group", "token")
# llm-compressor's MSE observer search (observers/mse.py): shrink factors 1 - i/grid for
# i < maxshrink·grid, error |x - fq(x)|^norm, stop after `patience` steps without improvement.
MSE_DEFAULTS = {"maxshrink": 0.20, "grid": 100.0, "norm": 2.4, "patience": 5, "expand": 1.0}
# llm-compressor 0.14's importance-weighted MSE observer (observers/imatrix.py, "imatrix_mse"): each weight's
# error counts E[x²] of its input channel (normalised to mean 1); candidates 1 - i/grid for i = 0 ...
# int(maxshrink·grid) inclusive, times ``expand``
IMATRIX_DEFAULTS = {"maxshrink": 0.95, "grid": 20.0, "norm": 3.0, "patience": 5, "expand": 1.0}
MSE_OBSERVERS = ("mse", "memoryless_mse", "imatrix_mse")


@dataclass(frozen=True)
class QuantArgs:
    """One QuantizationArgs entry (the subset of compressed-tensors fields we implement)."""

    num_bits: int = 8
    type: str = "int"  # "int" | "float"
    symmetric: bool = True
    strategy: str = "channel"
    group_size: int | None = None
    dynamic: bool | str = False  # True, False, or "local" (NVFP4 activations: per-group scales on the fly)
    actorder: str | None = None
    observer: str = "minmax"  # "minmax" | "mse" | "imatrix_mse"
    block_structure: tuple[int, int] | None = None  # strategy "block": [rows, cols]
    scale_dtype: str | None = None  # e.g. "float8_e4m3fn" (scales rounded to and stored in it)
    zp_dtype: str | None = None  # asymmetric: the zero point's dtype (int8 for int schemes)
    observer_kwargs: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.block_structure is not None:
            object.__setattr__(self, "block_structure", tuple(int(v) for v in self.block_structure))

    @property
    def is_fp4(self) -> bool:
        """FP4 E2M1 values (NVFP4 and MXFP4)."""
        return self.type == "float" and self.num_bits == 4

    @property
    def is_mx(self) -> bool:
        """An MX format (MXFP4 / MXFP8): power-of-two E8M0 scales, stored as uint8 exponents, per 32 values."""
        return self.scale_dtype == "uint8"

    @property
    def has_global_scale(self) -> bool:
        """NVFP4 (tensor_group): FP8 group scales under a float32 global scale."""
        return self.is_fp4 and self.strategy == "tensor_group"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["block_structure"] = list(self.block_structure) if self.block_structure else None
        return out

    def checkpoint_dict(self) -> dict:
        """QuantizationArgs fields valid for compressed-tensors 0.11 → 0.20 (doc §2.8); the newer
        optional ones (block_structure, scale_dtype, zp_dtype) only when they carry a value."""
        out = {"num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
               "strategy": self.strategy, "group_size": self.group_size, "dynamic": self.dynamic,
               "actorder": self.actorder, "observer": self.observer,
               "observer_kwargs": dict(self.observer_kwargs)}
        if self.block_structure:
            out["block_structure"] = list(self.block_structure)
        if self.scale_dtype:
            out["scale_dtype"] = f"torch.{self.scale_dtype}"
        if not self.symmetric:
            out["zp_dtype"] = f"torch.{self.zp_dtype or 'int8'}"
        return out


def int_range(bits: int) -> tuple[int, int]:
    """Signed range of a b-bit integer: int4 → (-8, 7), int8 → (-128, 127)."""
    assert 2 <= bits <= 8, bits
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _half_range(args: QuantArgs) -> float:
    if args.type == "float":
        assert args.num_bits in (4, 8), "floats are FP8 E4M3 or FP4 E2M1"
        return FP4_MAX if args.num_bits == 4 else FP8_MAX
    qmin, qmax = int_range(args.num_bits)
    return (qmax - qmin) / 2  # int4: 7.5, int8: 127.5


def _q_range(args: QuantArgs) -> tuple[float, float]:
    if args.type == "float":
        half = _half_range(args)
        return -half, half
    qmin, qmax = int_range(args.num_bits)
    return float(qmin), float(qmax)


def _groups(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``w`` [out, in] viewed as [*scale_shape, elements per scale entry] (blocks zero-padded)."""
    rows, cols = w.shape
    if args.strategy == "tensor":
        return w.reshape(1, -1)
    if args.strategy == "channel":
        return w.unsqueeze(1)
    if args.strategy in ("group", "tensor_group"):
        g = args.group_size
        assert g and cols % g == 0, f"group_size {g} must divide in-features {cols}"
        return w.reshape(rows, cols // g, g)
    if args.strategy == "block":
        bo, bi = args.block_structure
        pr, pc = (-rows) % bo, (-cols) % bi
        if pr or pc:
            w = torch.nn.functional.pad(w, (0, pc, 0, pr))
        r, c = w.shape
        return w.reshape(r // bo, bo, c // bi, bi).transpose(1, 2).reshape(r // bo, c // bi, bo * bi)
    raise ValueError(f"weight strategy {args.strategy!r} not supported")


def _grouped_absmax(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """absmax of w per tensor / row / group / block, shaped like the scale."""
    return _groups(w.float().abs(), args).amax(dim=-1)


def expand_scale(scale: torch.Tensor, shape: torch.Size | tuple[int, int], *,
                 block: tuple[int, int] | None = None, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Broadcast a tensor/channel/group/block scale (or zero point) to a full ``[out, in]`` shape.

    ``g_idx`` (act-order "group"): column j uses scale column ``g_idx[j]``.
    """
    rows, cols = shape
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(rows, cols)
    if block is not None:
        bo, bi = block
        return scale.repeat_interleave(bo, dim=0)[:rows].repeat_interleave(bi, dim=1)[:, :cols]
    if g_idx is not None:
        return scale[:, g_idx.long()]
    if scale.shape[1] == 1:
        return scale.expand(rows, cols)
    group = cols // scale.shape[1]
    return scale.repeat_interleave(group, dim=1)


def _block(args: QuantArgs | None) -> tuple[int, int] | None:
    return args.block_structure if args is not None and args.strategy == "block" else None


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


def _clean_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to the storage dtype and replace zero scales by that dtype's eps (doc §2.4)."""
    scale = scale.to(dtype)
    eps = torch.finfo(dtype).eps
    if dtype == FP8_DTYPE:  # torch.where does not take float8; go through float32
        f = scale.float()
        return torch.where(f == 0, torch.full_like(f, eps), f).to(dtype)
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


def fp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 global scale 448 · 6 / absmax(x) (float32 [1]): maps the largest group scale onto FP8's range."""
    absmax = x.float().abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    return (FP8_MAX * FP4_MAX / absmax).reshape(1)


def weight_global_scale(w: torch.Tensor, args: QuantArgs) -> torch.Tensor | None:
    """NVFP4 weights' global scale, or None. An MSE observer with ``expand`` > 1 may widen a group's range up
    to expand x its absmax, so the global scale leaves that room (llm-compressor searches in float32 and
    takes the global scale from the chosen ranges; a global scale from the plain absmax would push the
    widened group scales past FP8's 448)."""
    if not args.has_global_scale:
        return None
    expand = float((args.observer_kwargs or {}).get("expand", 1.0)) if args.observer in MSE_OBSERVERS else 1.0
    return fp4_global_scale(w) / expand


MX_ELEMENT_OFFSET = {4: 2, 8: 8}  # floor(log2(largest E2M1 / E4M3 value)): 6 → 2, 448 → 8


def mx_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """MX (E8M0) scale of groups with absolute maximum ``absmax``, as compressed-tensors 0.20's
    ``generate_mx_scales``: round absmax to a power of two (up when its mantissa is ≥ 1.75, the FP4
    mantissa width), subtract the element format's exponent offset, keep the exponent in E8M0's
    range [-127, 128]; returned as the float32 power of two (exactly representable)."""
    x = absmax.float().abs().contiguous()
    bits_ = x.view(torch.int32)
    rounded = ((bits_ + (1 << 21)) & 0x7F800000).view(torch.float32)  # mantissa 23, element mantissa 1
    exponent = torch.floor(torch.log2(rounded)) - MX_ELEMENT_OFFSET[bits]
    exponent = torch.clamp(torch.nan_to_num(exponent, neginf=-127.0), -127, 128)
    return torch.pow(2.0, exponent)


def mx_exponents(scale: torch.Tensor) -> torch.Tensor:
    """float power-of-two MX scales → their uint8 E8M0 codes (bias 127), the stored ``weight_scale``."""
    return (127 + torch.log2(scale.float())).round().clamp(0, 255).to(torch.uint8)


def mx_from_exponents(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes → float32 scales 2^(code - 127) (compressed-tensors' ``decompress_mx_scale``)."""
    return torch.pow(2.0, codes.to(torch.int32).float() - 127)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs, dtype: torch.dtype, *,
                       global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero point or None) for observed ranges [lo, hi] (compressed-tensors calculate_qparams).

    0 is always representable (lo ≤ 0 ≤ hi). Symmetric: absmax / half range. Asymmetric:
    (hi - lo) / (qmax - qmin), zp = clamp(round(qmin - lo / scale)). NVFP4 (tensor_group with a
    global scale): global · absmax / 6, rounded to FP8 E4M3 (the stored scale dtype).
    """
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if args.is_mx:  # power-of-two scales kept in float32 here; stored as uint8 exponents (mx_exponents)
        return mx_scale(torch.maximum(lo.abs(), hi), args.num_bits), None
    qmin, qmax = _q_range(args)
    if args.symmetric:
        scale = torch.maximum(lo.abs(), hi) / _half_range(args)
        zp = None
    else:
        assert args.type == "int", "asymmetric quantization is integer-only"
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(torch.finfo(torch.float32).eps)
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(_torch_dtype(args.zp_dtype) or torch.int8)
    if global_scale is not None:
        scale = scale * global_scale.float()
    store = _torch_dtype(args.scale_dtype) or (FP8_DTYPE if args.is_fp4 else dtype)
    return _clean_scale(scale, store), zp


def full_range_scale(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """The full-range symmetric integer scale (AutoRound's): the larger of |lo| and hi over 2^(bits-1),
    negative when hi is the larger, so that side maps to -2^(bits-1) exactly. Against min-max's
    ``absmax / ((2^bits - 1) / 2)`` (absmax / 7.5 at 4 bits, whose positive extreme clips at 7 steps and
    whose -8 level lies beyond the range) every level lies inside the group's range and the step is
    absmax / 8."""
    sign = torch.where(hi > -lo, -1.0, 1.0)
    return sign * torch.maximum(-lo, hi) / 2 ** (bits - 1)


def clippable(args: QuantArgs) -> bool:
    """Whether AWQ's activation-aware clipping (:func:`compression.algorithms.awq.clip_qparams`) applies:
    integer weights with group or channel scales under the min-max observer (an MSE observer runs its own
    range search)."""
    return (args.type == "int" and args.strategy in ("group", "channel")
            and args.observer not in MSE_OBSERVERS)


def uses_full_range(args: QuantArgs) -> bool:
    """Whether a full-range grid can replace the min-max scale of ``args``: symmetric integer weights
    with group or channel scales under the (default) min-max observer."""
    return args.symmetric and clippable(args)


def full_range_qparams(w: torch.Tensor, args: QuantArgs, dtype: torch.dtype) -> torch.Tensor:
    """:func:`full_range_scale` of every group / row of ``w``, in the storage dtype (scale shape of ``args``)."""
    lo, hi = observe(w, args)
    return _clean_scale(full_range_scale(lo, hi, args.num_bits), _torch_dtype(args.scale_dtype) or dtype)


def observe(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of every scale entry of ``w`` (the min-max observer's ranges, scale shape of ``args``)."""
    groups = _groups(w.float(), args)
    return groups.amin(dim=-1), groups.amax(dim=-1)


def compute_qparams(w: torch.Tensor, args: QuantArgs, dtype: torch.dtype | None = None, *,
                    global_scale: torch.Tensor | None = None, importance: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero point or None) for a weight, with the observer ``args.observer`` picks.

    ``importance`` ([in]: E[x²] of each input channel on the calibration data) weights the errors of the
    "imatrix_mse" observer; without it (or where it is unusable: not finite, negative, all zero) that
    observer is a plain MSE search over its own range, as llm-compressor falls back."""
    dtype = dtype or w.dtype
    lo, hi = observe(w, args)
    if args.observer in MSE_OBSERVERS:
        return _mse_search(w, args, dtype, lo, hi, global_scale, importance)
    return qparams_from_range(lo, hi, args, dtype, global_scale=global_scale)


def usable_importance(importance: torch.Tensor | None, cols: int) -> torch.Tensor | None:
    """``importance`` normalised to mean 1, or None where llm-compressor's imatrix observer would not use it."""
    if importance is None or importance.numel() != cols:
        return None
    imp = importance.detach().float().reshape(-1)
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()) or not bool((imp > 0).any()):
        return None
    return imp / (imp.mean() + torch.finfo(torch.float32).tiny)


# a scale entry wider than this is first scored on its PRUNE_TOP largest weights (see _mse_search)
PRUNE_WIDTH, PRUNE_TOP = 64, 32
# a candidate whose bound leaves more than PRUNE_KEEP of the entries open is scored on all of them, and
# after PRUNE_PATIENCE such candidates in a row the bound is no longer computed for the tensor
PRUNE_KEEP, PRUNE_PATIENCE = 0.95, 3


def _mse_search(w, args, dtype, lo, hi, global_scale, importance=None, *, prune=True):
    """llm-compressor's MSE / imatrix observer search: shrink the observed range by 1 - i/grid and keep,
    per scale entry, the candidate with the smallest Σ importance·|w - fq(w)|^norm.

    Exact but cheaper than scoring every candidate on every weight (``prune``): an entry's error over
    its ``PRUNE_TOP`` largest weights alone is a lower bound of its error over all of them, so a
    candidate is scored in full only on the entries where that bound is still below the best error so
    far (FP8 / INT8 per-channel: after the first candidates most rows are settled; 1536x576 FP8 rows
    ~5x faster). Entries of at most ``PRUNE_WIDTH`` weights (groups of 16-64) are always scored in
    full; where the bound settles almost nothing for ``PRUNE_PATIENCE`` candidates in a row (INT4:
    rounding error dominates) the rest of the search scores every entry without computing it.
    The early stop (``patience``) sees the same improvements either way."""
    imatrix = args.observer == "imatrix_mse"
    opts = {**(IMATRIX_DEFAULTS if imatrix else MSE_DEFAULTS), **(args.observer_kwargs or {})}
    grid, norm, patience = float(opts["grid"]), float(opts["norm"]), int(opts["patience"])
    expand = float(opts["expand"])
    lo, hi = lo * expand, hi * expand
    steps = int(float(opts["maxshrink"]) * grid)
    # llm-compressor: the MSE observers try i = 0 ... steps - 1, the imatrix observer i = 0 ... steps
    candidates = max(steps, 1) + 1 if imatrix else max(steps, 1)
    wf = w.float()
    weights = usable_importance(importance, w.shape[1]) if imatrix else None
    entries = _groups(wf, args)  # [*scale shape, width]
    width = entries.shape[-1]
    flat = entries.reshape(-1, width)  # [E, width], E in the scale's (flattened) order
    flat_weights = None if weights is None else _groups(weights.expand_as(wf), args).reshape(-1, width)
    # one scale per row: a quantizer for entries laid out as rows, identical element by element
    row_args = replace(args, strategy="channel", group_size=None, block_structure=None)
    pruning = prune and args.strategy != "tensor" and width > PRUNE_WIDTH and not args.is_fp4
    if pruning:
        top = torch.topk(flat.abs(), PRUNE_TOP, dim=1, sorted=False).indices
        top_w = flat.gather(1, top)
        top_weights = None if flat_weights is None else flat_weights.gather(1, top)

    def errors(values, scale, zp, imp):  # Σ imp·|v - fq(v)|^norm per row; scale / zp [n]
        deq = fake_quantize(values, scale.unsqueeze(1), row_args,
                            zero_point=None if zp is None else zp.unsqueeze(1), global_scale=global_scale)
        delta = (deq - values).abs().pow(norm)
        return (delta if imp is None else delta * imp).sum(dim=1)

    s0, z0 = qparams_from_range(lo, hi, args, dtype, global_scale=global_scale)
    best_s, best_z = s0.reshape(-1).clone(), None if z0 is None else z0.reshape(-1).clone()
    best_err = torch.full((flat.shape[0],), float("inf"), device=w.device)
    stale = unsettled = 0
    for i in range(candidates):
        p = 1 - i / grid
        scale, zp = qparams_from_range(lo * p, hi * p, args, dtype, global_scale=global_scale)
        scale = scale.reshape(-1)
        zp = None if zp is None else zp.reshape(-1)
        rows = None
        if pruning and i > 0:
            bound = errors(top_w, scale, zp, top_weights)
            rows = torch.nonzero(bound * (1 - 1e-6) < best_err).flatten()
            if rows.numel() > PRUNE_KEEP * flat.shape[0]:  # hardly any entry settled: no copies, all scored
                rows, unsettled = None, unsettled + 1
                # INT4: rounding error dominates, the bound never settles an entry; stop paying for it
                pruning = unsettled < PRUNE_PATIENCE
            else:
                unsettled = 0
        if rows is None:
            err = errors(flat, scale, zp, flat_weights)  # every entry, no copies
        else:
            err = errors(flat[rows], scale[rows], None if zp is None else zp[rows],
                         None if flat_weights is None else flat_weights[rows]) if rows.numel() else None
        improved = False
        if err is not None:
            better = err < (best_err if rows is None else best_err[rows])
            if bool(better.any()):
                won = better.nonzero().flatten() if rows is None else rows[better]
                best_err[won] = err[better]
                best_s[won] = scale[won]
                if zp is not None:
                    best_z[won] = zp[won]
                improved = True
        if improved:
            stale = 0
        else:
            stale += 1
            if stale >= patience and (patience > 0 or not imatrix):  # imatrix: patience 0 searches every step
                break
    return best_s.reshape(lo.shape), None if best_z is None else best_z.reshape(lo.shape)


def minmax_scale(w: torch.Tensor, args: QuantArgs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Symmetric scale from the absolute maximum: absmax / 7.5 (int4), / 127.5 (int8), / 448 (FP8)."""
    assert args.symmetric, "minmax_scale is the symmetric scale; use compute_qparams for zero points"
    return _clean_scale(_grouped_absmax(w, args) / _half_range(args), dtype or w.dtype)


def compute_scale(w: torch.Tensor, args: QuantArgs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The symmetric weight scale chosen by ``args.observer`` ("minmax" or "mse"), in ``dtype``.

    "mse" here uses the search range the caller put in ``observer_kwargs`` (llm-compressor's
    by default, :data:`MSE_DEFAULTS`)."""
    return compute_qparams(w, args, dtype)[0]


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 E2M1 value (ties as compressed-tensors' cast_to_fp4), saturating at ±6."""
    a = x.abs()
    out = torch.zeros_like(a)
    bounds = ((0.25, 0.5, False), (0.75, 1.0, True), (1.25, 1.5, False), (1.75, 2.0, True),
              (2.5, 3.0, False), (3.5, 4.0, True), (5.0, 6.0, False))
    for edge, value, inclusive in bounds:
        out = torch.where((a >= edge) if inclusive else (a > edge), torch.full_like(a, value), out)
    return out * torch.sign(x)


def _division_dtype(scale: torch.Tensor, storage: torch.dtype | None) -> torch.dtype:
    """The dtype ``w / scale`` is computed in: float32, or the 16-bit storage dtype when the scale is
    stored in it too (compressed-tensors' round-to-nearest divides the stored weight by its scale
    with torch's type promotion, so a bf16 weight over a bf16 scale is divided in bf16)."""
    if storage in (torch.bfloat16, torch.float16) and scale.dtype == storage:
        return storage
    return torch.float32


def quantize_int(w: torch.Tensor, scale: torch.Tensor, bits: int, zero_point: torch.Tensor | None = None, *,
                 block: tuple[int, int] | None = None, g_idx: torch.Tensor | None = None,
                 storage: torch.dtype | None = None) -> torch.Tensor:
    """q = clamp(round(w / scale + zp), qmin, qmax) as int8; scale tensor/channel/group/block.

    ``storage``: the weight's stored dtype when ``w`` is rounded to nearest (see :func:`_division_dtype`);
    GPTQ's columns are divided in float32 as llm-compressor's GPTQ does."""
    assert w.dim() == 2 and w.is_floating_point(), (w.shape, w.dtype)
    qmin, qmax = int_range(bits)
    s = expand_scale(scale, w.shape, block=block, g_idx=g_idx)
    dt = _division_dtype(scale, storage)
    q = w.to(dt) / s.to(dt)
    if zero_point is not None:
        q = q + expand_scale(zero_point, w.shape, block=block, g_idx=g_idx).to(dt)
    return torch.clamp(torch.round(q.float()), qmin, qmax).to(torch.int8)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None,
                   zero_point: torch.Tensor | None = None, *, block: tuple[int, int] | None = None,
                   g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """(q - zp) · scale, computed in the scale's dtype like compressed-tensors does."""
    assert q.dtype in (torch.int8, torch.int32), q.dtype
    s = expand_scale(scale, q.shape, block=block, g_idx=g_idx)
    v = q.to(s.dtype)
    if zero_point is not None:
        v = v - expand_scale(zero_point, q.shape, block=block, g_idx=g_idx).to(s.dtype)
    return (v * s).to(dtype or s.dtype)


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor, *, block: tuple[int, int] | None = None,
                 storage: torch.dtype | None = None) -> torch.Tensor:
    """float8_e4m3fn(clamp(w / scale, ±448)); ``storage`` as in :func:`quantize_int`."""
    assert w.dim() == 2 and w.is_floating_point(), (w.shape, w.dtype)
    s = expand_scale(scale, w.shape, block=block)
    dt = _division_dtype(scale, storage)
    return torch.clamp(w.to(dt) / s.to(dt), -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None, *,
                   block: tuple[int, int] | None = None) -> torch.Tensor:
    """q · scale in the scale's dtype."""
    assert q.dtype == FP8_DTYPE, q.dtype
    s = expand_scale(scale, q.shape, block=block)
    return (q.to(s.dtype) * s).to(dtype or s.dtype)


def _fp4_effective_scale(scale: torch.Tensor, global_scale: torch.Tensor, shape) -> torch.Tensor:
    return expand_scale(scale.float() / global_scale.float(), shape)


def quantize_fp4(w: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E2M1 values (float32, in {0, ±0.5, …, ±6}) of w / (scale / global_scale)."""
    return round_to_e2m1(w.float() / _fp4_effective_scale(scale, global_scale, w.shape))


def dequantize_fp4(q: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    return (q.float() * _fp4_effective_scale(scale, global_scale, q.shape)).to(dtype or torch.float32)


def quantize(w: torch.Tensor, scale: torch.Tensor, args: QuantArgs, *, zero_point: torch.Tensor | None = None,
             global_scale: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
             storage: torch.dtype | None = None) -> torch.Tensor:
    """Integer (int8 container), float8 or E2M1 (float32 values) codes of ``w``; ``storage``: see
    :func:`quantize_int` (round-to-nearest only)."""
    if args.is_fp4 and global_scale is None:  # MXFP4: E2M1 values of w / (power-of-two group scale)
        assert args.is_mx, "NVFP4 needs its global scale"
        return round_to_e2m1(w.float() / expand_scale(scale.float(), w.shape))
    if args.is_fp4:
        return quantize_fp4(w, scale, global_scale)
    if args.type == "float":
        return quantize_fp8(w, scale, block=_block(args), storage=storage)
    return quantize_int(w, scale, args.num_bits, zero_point, block=_block(args), g_idx=g_idx, storage=storage)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None, *,
               args: QuantArgs | None = None, zero_point: torch.Tensor | None = None,
               global_scale: torch.Tensor | None = None, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    if global_scale is None and args is not None and args.is_fp4:  # MXFP4
        return (q.float() * expand_scale(scale.float(), q.shape)).to(dtype or torch.float32)
    if global_scale is not None or (args is not None and args.is_fp4):
        return dequantize_fp4(q, scale, global_scale, dtype)
    if q.dtype == FP8_DTYPE:
        return dequantize_fp8(q, scale, dtype, block=_block(args))
    return dequantize_int(q, scale, dtype, zero_point, block=_block(args), g_idx=g_idx)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, args: QuantArgs, *, zero_point: torch.Tensor | None = None,
                  global_scale: torch.Tensor | None = None, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize(w)) in ``w``'s dtype."""
    q = quantize(w, scale, args, zero_point=zero_point, global_scale=global_scale, g_idx=g_idx)
    return dequantize(q, scale, w.dtype, args=args, zero_point=zero_point, global_scale=global_scale, g_idx=g_idx)


def fake_quantize_activation(x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None = None,
                             input_zero_point: torch.Tensor | None = None,
                             global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize an activation like compressed-tensors' forward.

    Dynamic: per token, per tensor, or per group of ``group_size`` channels of each token
    (FP8_BLOCK; NVFP4's "local" groups with the static ``global_scale``); symmetric or with a
    zero point. Static: the calibrated ``input_scale`` (and ``input_zero_point``).
    """
    shape = x.shape
    grouped = args.strategy in ("group", "tensor_group")
    v = x.unflatten(-1, (shape[-1] // args.group_size, args.group_size)) if grouped else x
    zp = None
    if args.dynamic:
        if args.strategy == "tensor":
            lo, hi = v.amin().reshape(1), v.amax().reshape(1)
        else:
            lo, hi = v.amin(dim=-1, keepdim=True), v.amax(dim=-1, keepdim=True)
        scale, zp = qparams_from_range(lo, hi, args, torch.float32, global_scale=global_scale)
        scale = scale.float()
    else:
        assert input_scale is not None, "static activation quantization needs an input_scale"
        scale = input_scale.to(device=x.device, dtype=torch.float32)
        zp = input_zero_point
    if global_scale is not None:
        scale = scale / global_scale.float()
    qmin, qmax = _q_range(args)
    y = v.float() / scale
    if args.is_fp4:
        q = round_to_e2m1(y)
    elif args.type == "float":
        q = torch.clamp(y, -FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    else:
        if zp is not None:
            y = y + zp.float()
        q = torch.clamp(torch.round(y), qmin, qmax)
        if zp is not None:
            q = q - zp.float()
    return (q * scale).reshape(shape).to(x.dtype)


def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values [out, in] (in even) → uint8 [out, in / 2]: column 2j in the low nibble, 2j+1 in the
    high one; a nibble is the magnitude's 3-bit code plus the sign in bit 3 (compressed-tensors layout)."""
    assert values.dim() == 2 and values.shape[1] % 2 == 0, values.shape
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    mags = values.float().abs()
    codes = torch.argmin((mags.unsqueeze(-1) - grid).abs(), dim=-1)
    assert torch.equal(grid[codes], mags), "values must lie on the E2M1 grid"
    nib = (codes + (torch.signbit(values.float()).to(torch.long) << 3)).reshape(values.shape[0], -1, 2)
    return (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 [out, in / 2] → float32 E2M1 values [out, in]."""
    assert packed.dtype == torch.uint8, packed.dtype
    p = packed.to(torch.long)
    nib = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(packed.shape[0], -1)
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return grid[nib & 7] * torch.where((nib & 8) != 0, -1.0, 1.0)
