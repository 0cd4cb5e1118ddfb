"""GPTQ (Frantar et al.) as plain functions: Hessian accumulation, robust inverse, the blocked sweep.

Shared with SparseGPT: :class:`HessianAccumulator`, :func:`prepare_hessian` and
:func:`inverse_hessian_upper`. All math is fp32 with TF32 disabled (reference doc §3.1, §3.4).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from dataclasses import dataclass

import torch

from compression.algorithms.quant import (FP8_DTYPE, FP8_MAX, QuantArgs, compute_qparams, dequantize, expand_scale,
                               full_range_qparams, int_range, quantize, round_to_e2m1,
                               uses_full_range, weight_global_scale)

log = logging.getLogger(__name__)

DAMPENING_RETRIES = (10.0, 100.0)  # multipliers tried after the configured dampening fails


class CholeskyFailed(RuntimeError):
    """The dampened Hessian stayed non positive-definite after every retry."""


def disable_tf32() -> None:
    """TF32 matmuls lose ~3 decimal digits and turn ill-conditioned Hessians into NaNs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (AMX tiles, AVX512-BF16, AMX-FP16)."""
    checks = {torch.bfloat16: ("_is_amx_tile_supported", "_is_avx512_bf16_supported"),
              torch.float16: ("_is_amx_fp16_supported",)}.get(dtype, ())
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@contextlib.contextmanager
def sweep_threads(device: torch.device):
    """Run the column sweep (and the scale search) single-threaded on CPU.

    The sweep is thousands of tiny ops; with intra-op threads on a busy 2-core machine the
    OpenMP hand-offs made a 1536x576 GPTQ 20x slower (10.7 s vs 0.45 s) than one thread.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class HessianAccumulator:
    """Running average H = (2/n) Σ XᵀX over calibration samples, in fp32 (n counts sequences)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.samples = 0
        self.inverses: dict = {}  # inverse factors of the finished Hessian (see :func:`cached_inverse`)

    def add(self, x: torch.Tensor, sequences: int | None = None) -> None:
        """Add one forward call's input ``x`` of shape [batch, ..., columns]; ``sequences``: how many
        sequences its rows come from (default: ``batch`` for a 3-D ``x``, else one), e.g. the samples
        of a padded batch whose pad rows were left out."""
        batch = sequences if sequences is not None else (x.shape[0] if x.dim() > 2 else 1)
        self.inverses.clear()
        rows = x.reshape(-1, x.shape[-1])
        total = self.samples + batch
        if rows.dtype == torch.bfloat16 and rows.device.type == "cpu" and self.hessian.device.type == "cpu":
            gemm = _bf16_gemm()
            if gemm is not None:  # H = (n/total) H + (2/total) XᵀX straight from the bf16 rows (rows scaled
                # first would no longer be bf16; on the 135M demo this flips fewer codes of layer 0 than
                # reversing the calibration order does, 0.006% vs 0.011%)
                gemm(rows, self.hessian, 2.0 / total, self.samples / total)
                self.samples = total
                return
        x = rows.to(self.hessian.device, torch.float32)
        self.hessian.mul_(self.samples / total)
        # (scaling inside addmm_ by alpha instead flipped 2% of the codes between batched and one-sample
        # calibration on the tiny test models: GPTQ amplifies the different rounding)
        if x.data_ptr() == rows.data_ptr():  # already float32 there: the caller's tensor, not ours to scale
            x = x * (2.0 / total) ** 0.5
        else:  # our own float32 copy: scaled in place (the same products), no second copy of the rows
            x.mul_((2.0 / total) ** 0.5)
        self.hessian.addmm_(x.t(), x)
        self.samples = total


@functools.cache
def _bf16_gemm():
    """``gemm(x, h, alpha, beta)``: h = alpha·xᵀx + beta·h for bf16 rows ``x`` [N, C] and a float32 [C, C]
    ``h``, by MKL's ``cblas_gemm_bf16bf16f32`` (exported by torch's own CPU library), on a CPU that
    multiplies bf16 in hardware (AMX / AVX512-BF16); None elsewhere.

    A product of two bf16 numbers is exact in float32 and MKL sums the products in float32, so this is
    the float32 XᵀX of the widened rows up to the summation order (on the 135M demo's activations its
    error against float64 is 2-10x below float32 sgemm's), 5x faster than widening the rows and
    multiplying in float32 (torch has no bf16 x bf16 -> float32 matmul on the CPU). A small product
    is checked against float32 once; any mismatch (another BLAS, another integer ABI) leaves it off.
    """
    if not any(bool(getattr(torch.cpu, name, lambda: False)())
               for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")):
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    i32, f32, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.restype = None
    fn.argtypes = [i32, i32, i32, i32, i32, i32, f32, ptr, i32, ptr, i32, f32, ptr, i32]
    row_major, trans, no_trans = 101, 112, 111

    def gemm(x: torch.Tensor, h: torch.Tensor, alpha: float, beta: float) -> None:
        if x.stride(-1) != 1 or x.stride(0) < x.shape[1]:
            x = x.contiguous()
        n, c = x.shape
        assert h.dtype == torch.float32 and h.is_contiguous() and h.shape == (c, c)
        if n == 0:
            h.mul_(beta)
            return
        fn(row_major, trans, no_trans, c, c, n, alpha, x.data_ptr(), x.stride(0), x.data_ptr(), x.stride(0),
           beta, h.data_ptr(), c)

    probe = (torch.arange(-40, 56, dtype=torch.float32).reshape(-1, 1) * torch.linspace(-1, 1, 24)
             ).to(torch.bfloat16)  # [96, 24]
    got = torch.full((24, 24), 1.0)
    gemm(probe, got, 0.5, 2.0)
    wide = probe.float()
    want = 0.5 * (wide.t() @ wide) + 2.0
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-3):
        log.warning("MKL's bf16 gemm disagrees with float32 here; Hessians use the float32 matmul")
        return None
    return gemm


def live_hessian(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 copy of H with the diagonal of dead inputs (H_ii = 0: no calibration token reached them)
    set to 1, and the dead inputs' mask."""
    h = hessian.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    return h, dead


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Handle dead inputs: H_ii = 0 → H_ii = 1 and W[:, i] = 0. Returns copies (H, W, n_dead)."""
    h, dead = live_hessian(hessian)
    w = weight.clone().float()
    w[:, dead] = 0.0
    return h, w, int(dead.sum())


def inverse_hessian_upper(hessian: torch.Tensor, dampening_frac: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so H⁻¹ = UᵀU), λ = frac · mean(diag H).

    Retries with dampening multiplied by :data:`DAMPENING_RETRIES`; raises :class:`CholeskyFailed`.
    Returns (U, dampening_frac actually used).
    """
    with sweep_threads(hessian.device):  # LAPACK's potri on 2 busy cores: 0.93 s with 2 threads, 0.14 s with 1
        return _inverse_hessian_upper(hessian, dampening_frac)


def cached_inverse(inverses: dict | None, hessian: torch.Tensor, dampening_frac: float,
                   order: str | None = None) -> tuple[torch.Tensor, float]:
    """:func:`inverse_hessian_upper` of the prepared ``hessian`` (its columns in ``order``: None, or sorted
    by decreasing diagonal), looked up in and kept in ``inverses`` (a failure too)."""
    key = (float(dampening_frac), order)
    found = inverses.get(key) if inverses is not None else None
    if found is None:
        try:
            found = inverse_hessian_upper(hessian, dampening_frac)
        except CholeskyFailed as exc:
            found = exc
        if inverses is not None:
            inverses[key] = found
    if isinstance(found, CholeskyFailed):
        raise found
    return found


def _inverse_hessian_upper(hessian: torch.Tensor, dampening_frac: float) -> tuple[torch.Tensor, float]:
    mean_diag = torch.mean(torch.diag(hessian)).item()
    fracs = [dampening_frac] + [max(dampening_frac, 1e-3) * m for m in DAMPENING_RETRIES]
    last_error = "non-finite Hessian"
    for frac in fracs:
        if not torch.isfinite(hessian).all():
            break
        h = _damped(hessian, frac * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        del h
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and torch.isfinite(upper).all():
                if frac != dampening_frac:
                    log.warning("Cholesky needed dampening %.4g (configured %.4g)", frac, dampening_frac)
                return upper, frac
        last_error = f"not positive-definite with dampening_frac={frac:.4g} (leading minor {int(info)})"
        log.warning("Cholesky failed: %s", last_error)
    raise CholeskyFailed(last_error)


def _damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``hessian + damp * I`` with the same bits, without the three n x n temporaries of that expression:
    adding +0.0 everywhere is what ``+ 0 * damp`` did off the diagonal (it turns -0.0 into +0.0)."""
    h = hessian + 0.0
    h.diagonal().add_(damp)
    return h


@dataclass
class QuantResult:
    """What compressing one Linear produced; ``weight`` is the dequantized (fake-quant) weight.

    ``zero_point`` (asymmetric int), ``global_scale`` (NVFP4) and ``g_idx`` (act-order "group":
    column j uses scale column g_idx[j]) are None when the scheme has none."""

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    loss: float
    dead_columns: int = 0
    dampening_frac: float | None = None
    fallback: str | None = None
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None


def quadratic_loss(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """½ Σ_rows δ H δᵀ = mean over samples of ‖δX‖² for H = (2/n) Σ XᵀX."""
    delta = delta.float()
    return 0.5 * float(torch.sum((delta @ hessian) * delta))


def quantize_weight(weight: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype,
                    mask: torch.Tensor | None = None, *,
                    qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                    importance: torch.Tensor | None = None) -> QuantResult:
    """Round-to-nearest for any weight scheme (int sym/asym, FP8 tensor/channel/block, NVFP4), with the
    observer's scales or the given ``qparams`` (scale, zero point; not for schemes with a global scale).
    ``importance``: E[x²] per input channel, for the "imatrix_mse" observer."""
    if mask is not None:
        weight = weight.masked_fill(mask, 0.0)  # quantize(+0.0) is 0 for every format
    gscale = weight_global_scale(weight, args)
    assert qparams is None or gscale is None, "given qparams carry no global scale"
    scale, zp = qparams if qparams is not None else compute_qparams(weight, args, scale_dtype, global_scale=gscale,
                                                                    importance=importance)
    codes = quantize(weight, scale, args, zero_point=zp, global_scale=gscale, storage=scale_dtype)
    deq = dequantize(codes, scale, weight.dtype, args=args, zero_point=zp, global_scale=gscale)
    return QuantResult(deq, codes, scale, 0.0, zero_point=zp, global_scale=gscale)


def round_to_nearest(weight: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN baseline: (codes, scale, dequantized weight in weight.dtype); masked entries stay zero."""
    with sweep_threads(weight.device):  # the MSE search is many mid-sized ops too
        r = quantize_weight(weight, args, scale_dtype, mask)
    return r.codes, r.scale, r.weight


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, *, block_size: int = 128,
                  dampening_frac: float = 0.01, actorder: str | None = None, mask: torch.Tensor | None = None,
                  scale_dtype: torch.dtype | None = None, refit: bool = True, full_range: bool = False,
                  resweeps: int | None = None, inverses: dict | None = None) -> QuantResult:
    """Quantize ``weight`` [out, in] column by column, compensating each error on the later columns.

    Static groups: scales (and zero points) come from the (dead-column-cleaned) original weight
    before the sweep, so with ``actorder="static"`` the columns are visited by decreasing diag(H)
    while every group keeps its scale in column order (no g_idx). ``actorder="group"`` forms the
    groups in that visiting order instead and returns ``g_idx`` (compressed-tensors' GROUP
    act-order). ``mask`` (True = pruned) keeps those weights at exactly zero. Any weight format
    works (int with or without zero points, FP8, NVFP4): each column is fake-quantized with its own
    scale. On Cholesky failure (after dampening retries) falls back to round-to-nearest and says so
    in ``fallback``. The loss is Σ (w - q)² / (2 U_ii²) = ½ Σ δ H_damped δᵀ.

    ``refit`` (integer group / channel scales, static groups): once the sweep has fixed the integer
    codes, each row's scales are re-fitted by least squares in the Hessian metric
    (:func:`refit_scales`) -- the engine's addition to GPTQ; llm-compressor keeps the observer's scales.
    Then up to ``resweeps`` more sweeps run with the refitted scales (new codes), each refitted again,
    while the Hessian-metric error keeps falling (on the demo's layers 0, 5, 11 two more sweeps lowered
    the summed error 8% for full-range symmetric and 17% for asymmetric group-64 INT4 scales). Default
    (None): 2 for integer weights of at most 4 bits, where it was measured; 0 for wider ones (INT8 has
    256 levels: little to win, and more sweeps amplify float-rounding differences into flipped codes).

    ``full_range`` (symmetric integer group / channel scales under the min-max observer,
    :func:`~compression.algorithms.quant.uses_full_range`): the scales are the full-range grid's
    (:func:`~compression.algorithms.quant.full_range_scale`: absmax / 2^(bits-1), negative where the
    positive side is the larger) instead of min-max's absmax / 7.5 -- the engine's choice for GPTQ
    (on the demo model, W4A16 group 64: perplexity ratio 1.203 against 1.287 with min-max scales).

    ``inverses``: a dict kept with ``hessian`` (:attr:`HessianAccumulator.inverses`) that holds the
    inverse factor (it depends on the Hessian, the dampening and the visiting order alone) for the
    other modules sharing the Hessian (q/k/v, gate/up).
    """
    assert weight.dim() == 2 and hessian.shape == (weight.shape[1],) * 2, (weight.shape, hessian.shape)
    assert block_size > 0
    disable_tf32()
    scale_dtype = scale_dtype or weight.dtype
    h, w, n_dead = prepare_hessian(hessian, weight)
    if mask is not None:
        w = w.masked_fill(mask, 0.0)
    perm = torch.argsort(torch.diag(h), descending=True) if actorder else None
    group_order = actorder == "group" and args.strategy == "group"
    gscale = weight_global_scale(w, args)
    # scales from the original weight: in column order, or in visiting order for act-order "group"
    with sweep_threads(w.device):  # the MSE search is many mid-sized ops too
        observed = w[:, perm] if group_order else w
        if full_range and uses_full_range(args):
            scale, zp = full_range_qparams(observed, args, scale_dtype), None
        else:
            # the imatrix observer weighs each input channel by E[x²]: H's diagonal (up to a constant)
            importance = torch.diag(hessian) if args.observer == "imatrix_mse" else None
            if importance is not None and group_order:
                importance = importance[perm]
            scale, zp = compute_qparams(observed, args, scale_dtype, global_scale=gscale, importance=importance)
    try:
        upper_full, used = cached_inverse(inverses, h if perm is None else h[perm][:, perm], dampening_frac,
                                          None if perm is None else "by decreasing diagonal")
    except CholeskyFailed as exc:
        r = quantize_weight(w, args, scale_dtype, mask)
        r.weight = r.weight.to(weight.dtype)
        r.loss = quadratic_loss(r.weight.float() - weight.float(), h)
        r.dead_columns, r.fallback = n_dead, f"GPTQ Cholesky failed ({exc}); used round-to-nearest"
        return r

    block = args.block_structure if args.strategy == "block" else None
    m = mask[:, perm] if mask is not None and perm is not None else mask
    inverse = torch.argsort(perm) if perm is not None else None
    g_idx = (inverse // args.group_size).to(torch.int32) if group_order else None
    fits = refit and refittable(args) and g_idx is None
    w_ref = w  # the target the refit fits (dead columns cleaned, pruned zeros): never swept in place when it fits
    if resweeps is None:
        resweeps = default_resweeps(args)

    def sweep(scale: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(codes, loss) of one GPTQ sweep over the weight with these (static) scales."""
        eff = scale.float() / gscale if gscale is not None else scale.float()
        col_scale = expand_scale(eff, w.shape, block=block)  # visiting order already when group_order
        col_zp = expand_scale(zp.float(), w.shape, block=block) if zp is not None else None
        if perm is not None and not group_order:
            col_scale = col_scale[:, perm]
            col_zp = col_zp[:, perm] if col_zp is not None else None
        # the sweep works in place: on a copy (in visiting order) when the weight is needed again
        work = w[:, perm] if perm is not None else (w.clone() if fits else w)
        q_all = torch.zeros_like(work)
        losses = torch.zeros(work.shape[0], device=work.device)
        with sweep_threads(w.device):
            _gptq_sweep(work, upper_full, col_scale, m, q_all, losses, block_size, _column_quantizer(args, col_zp))
        if inverse is not None:
            q_all = q_all[:, inverse]
        return quantize(q_all, scale, args, zero_point=zp, global_scale=gscale, g_idx=g_idx), float(losses.sum())

    codes, loss = sweep(scale)
    # The refit (integer group / channel scales, static groups): the scales that fit the sweep's codes best;
    # then up to ``resweeps`` more sweeps with those scales, each refitted, while the error keeps falling.
    # Rounds are compared in the undamped Hessian metric the refit minimizes: the damping term (1% of the
    # mean diagonal) can outweigh most of H where one huge activation dominates it (the sweep's own loss
    # on the demo's layer-11 down_proj was 7x the undamped error), and a damped comparison picked worse rounds.
    def error(codes: torch.Tensor, scale: torch.Tensor, metric: torch.Tensor) -> float:
        return quadratic_loss(dequantize(codes, scale, torch.float32, args=args, zero_point=zp) - w_ref, metric)
    first = scale
    if fits:
        with sweep_threads(w.device):
            scale = refit_scales(w_ref, codes, scale, zp, h, args)
        err = error(codes, scale, h)
        for _ in range(resweeps):  # a round: a sweep with the current scales, its codes' own refit
            new_codes, _ = sweep(scale)
            with sweep_threads(w.device):
                new_scale = refit_scales(w_ref, new_codes, scale, zp, h, args)
            new_err = error(new_codes, new_scale, h)
            if new_err >= err:
                break
            codes, scale, err = new_codes, new_scale, new_err
    if fits and not torch.equal(scale, first):  # reported in the same measure as the sweep's loss
        loss = error(codes, scale, _damped(h, used * torch.mean(torch.diag(h))))
    if mask is not None:
        codes = codes.masked_fill(mask, 0) if codes.dtype != FP8_DTYPE else codes.view(torch.uint8).masked_fill(
            mask, 0).view(FP8_DTYPE)
    deq = dequantize(codes, scale, weight.dtype, args=args, zero_point=zp, global_scale=gscale, g_idx=g_idx)
    if mask is not None:
        deq.add_(0.0)  # pruned zeros times a negative (full-range) scale are -0.0; 2:4 zeros stay +0.0
    return QuantResult(deq, codes, scale, loss, n_dead, used, None, zp, gscale, g_idx)


def default_resweeps(args: QuantArgs) -> int:
    """Sweeps after the first that :func:`gptq_quantize` runs by default for a refitted scheme: 2 at <= 4 bits
    (where they were measured to help), none for wider integers."""
    return 2 if args.num_bits <= 4 else 0


def refittable(args: QuantArgs) -> bool:
    """Whether :func:`refit_scales` applies to ``args``: integer weights with group or channel scales (and
    static groups: no g_idx, which :func:`gptq_quantize` checks)."""
    return args.type == "int" and args.strategy in ("group", "channel")


def refit_scales(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 hessian: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Per row, the scales minimizing (w - ŵ) H (w - ŵ)ᵀ with the integer codes held fixed.

    ŵ_j = s_g(j) · (q_j - z_g(j)) is linear in the row's scales s (one per group, or one per row for
    channel scales), so the optimum solves A s = b with A_gh = Σ_{j∈g, k∈h} c_j H_jk c_k and
    b_g = Σ_{j∈g} c_j (H w)_j, c = q - z. A row keeps its old scales where the solution is not
    finite and of the old scales' signs (full-range scales may be negative) or, after rounding to the
    scale dtype, does not lower that row's error.
    Returns the new scale tensor (same shape and dtype as ``scale``).
    """
    rows, cols = weight.shape
    n_groups = scale.shape[1]
    size = cols // n_groups
    # float64: a Hessian dominated by a few huge activations (an attention-sink token holds 94% of the
    # demo's layer-11 down_proj input energy) leaves A so ill-conditioned that float32 sums decided rows
    # the wrong way (that module's refit error doubled when only the order of A's sums changed)
    wide = torch.float64 if weight.device.type != "mps" else torch.float32
    h = hessian.to(wide)
    c = codes.to(wide)
    if zero_point is not None:
        c = c - expand_scale(zero_point.to(wide), c.shape)
    a = torch.empty(rows, n_groups, n_groups, dtype=wide, device=weight.device)
    for g in range(n_groups):  # A is symmetric: the blocks on and below the diagonal, mirrored
        lo = g * size
        part = c[:, lo:lo + size] @ h[lo:lo + size, lo:]  # [rows, cols - lo]
        a[:, g:, g] = (c[:, lo:] * part).reshape(rows, n_groups - g, size).sum(-1)
        a[:, g, g + 1:] = a[:, g + 1:, g]
    b = (c * (weight.to(wide) @ h)).reshape(rows, n_groups, size).sum(-1)
    ridge = 1e-6 * torch.diagonal(a, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    solved, info = torch.linalg.solve_ex(a + torch.diag_embed(ridge.unsqueeze(1).expand(rows, n_groups)),
                                         b.unsqueeze(-1))
    new = solved.squeeze(-1)
    ok = (info == 0) & torch.isfinite(new).all(dim=1) & (new * scale.float() > 0).all(dim=1)
    new = torch.where(ok.unsqueeze(1), new, scale.to(wide)).to(scale.dtype)
    # a row's error is e(s) = sᵀAs - 2bᵀs + wᵀHw, so e(new) - e(old) = dᵀ(A(new + old) - 2b) with
    # d = new - old: the same comparison without two more [rows, cols] x [cols, cols] products
    s_new, s_old = new.to(wide), scale.to(wide)
    change = ((s_new - s_old) * (torch.bmm(a, (s_new + s_old).unsqueeze(-1)).squeeze(-1) - 2 * b)).sum(dim=1)
    better = ok & (change < 0)
    return torch.where(better.unsqueeze(1), new, scale)


def _column_quantizer(args: QuantArgs, col_zp: torch.Tensor | None):
    """fq(column, scale column, column index, out): the column fake-quantized in fp32, written into ``out``."""
    if args.is_fp4:
        return lambda col, s, j, out: torch.mul(round_to_e2m1(col / s), s, out=out)
    if args.type == "float":
        return lambda col, s, j, out: torch.mul(torch.clamp(col / s, -FP8_MAX, FP8_MAX).to(FP8_DTYPE).float(), s,
                                                out=out)
    qmin, qmax = int_range(args.num_bits)
    if col_zp is None:
        return lambda col, s, j, out: torch.div(col, s, out=out).round_().clamp_(qmin, qmax).mul_(s)
    zp_cols = col_zp.t().contiguous()  # column j of the zero points as one contiguous row

    def fq(col, s, j, out):
        z = zp_cols[j]
        return torch.div(col, s, out=out).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
    return fq


def _gptq_sweep(w: torch.Tensor, upper_full: torch.Tensor, col_scale: torch.Tensor, m: torch.Tensor | None,
                q_all: torch.Tensor, losses: torch.Tensor, block_size: int, fq) -> None:
    """The blocked GPTQ column loop (in place on ``w``, ``q_all``, ``losses``).

    Each block is held transposed (column i of the block is the contiguous row i), so a column costs
    a handful of in-place ops on contiguous rows: the quantizer's, err = (w - q) / U_ii, and the
    rank-1 update w -= err · u of the block's later columns (the same products and differences as
    before, so the same codes bit for bit). The loss Σ (w - q)² / (2 U_ii²) = Σ err² / 2 is summed
    once per block.
    """
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].t().contiguous()
        s1 = col_scale[:, i1:i2].t().contiguous()
        m1 = m[:, i1:i2].t().contiguous() if m is not None else None
        u1 = upper_full[i1:i2, i1:i2]
        q1 = torch.empty_like(w1)
        err1 = torch.empty_like(w1)
        prod = torch.empty_like(w1)
        ucols = u1.unsqueeze(2)  # u1[i, j] as a [.., 1] column against err's row
        last = i2 - i1 - 1
        for i, d in enumerate(u1.diagonal().tolist()):
            col, q, err = w1[i], q1[i], err1[i]
            fq(col, s1[i], i1 + i, q)
            if m1 is not None:
                q.masked_fill_(m1[i], 0.0)
            torch.sub(col, q, out=err).div_(d)
            if i < last:  # w -= err * u, as two ops (addr_ fuses them and rounds differently)
                w1[i + 1:].sub_(torch.mul(ucols[i, i + 1:], err, out=prod[i + 1:]))
        q_all[:, i1:i2] = q1.t()
        losses += err1.square().sum(0).mul_(0.5)
        if i2 < cols:
            w[:, i2:] -= err1.t().contiguous() @ upper_full[i1:i2, i2:]
