"""The one home of the packed layouts: INT4/INT8 words (what export writes and the kernels read) and
the compact 2:4 form, plus the 2:4 pattern check used by the engine and the loader. Torch only.

INT4 (compressed-tensors ``pack-quantized``, reference doc §2.4), for a row of signed codes
q[0..K) in [-8, 7]::

    u = q + 8                                  (unsigned nibble 0..15)
    word j = u[8j] | u[8j+1] << 4 | ... | u[8j+7] << 28      → int32 (reinterpreted, may be < 0)
    packed [N, ceil(K / 8)]; a row is zero-padded (q = -8 → u = 0) up to a multiple of 8

Compact 2:4 (built at load time from a dense-with-zeros weight [N, K], K % 4 == 0). Every group
g of four input columns (4g..4g+3) keeps exactly two entries, at positions i0 < i1 (zeros are
kept as padding when a group holds fewer than two non-zeros)::

    values [N, K/2]    values[n, 2g] = W[n, 4g + i0],  values[n, 2g + 1] = W[n, 4g + i1]
    meta   [N, ceil(K/32)] int32: compact column c's 2-bit position (i0 or i1) sits in
           bits [2·(c % 16), 2·(c % 16) + 2) of word c // 16  (16 kept values = 8 groups per word;
           for group g: i0 at bit 4·(g % 8), i1 at bit 4·(g % 8) + 2 of word g // 8)

INT4 2:4 stores the kept codes of ``values`` packed with the INT4 layout above along the compact
dimension: [N, ceil(K/16)] int32.
"""
from __future__ import annotations

import torch

META_PER_WORD = 16


def _to_int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) → the same bits as int32."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_int(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Signed b-bit codes int8 [N, K] (2 ≤ b ≤ 8) → int32 [N, ceil(K·b/32)] (compressed-tensors
    ``pack_to_int32``): u = q + 2^(b-1); column k of a row lands at bit k·b of the row's bit string
    (little-endian words; for b = 3, 5, 6, 7 a code may straddle two words), so for 4 bits column
    8j+i sits in bits [4i, 4i+4) of word j (layout in the module docstring). A row is zero-padded
    (u = 0) up to a whole word; :func:`unpack_int` drops the padding."""
    assert 2 <= bits <= 8, bits
    assert q.dim() == 2 and q.dtype == torch.int8, (q.shape, q.dtype)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert q.numel() == 0 or (int(q.min()) >= lo and int(q.max()) <= hi), f"int{bits} codes must lie in [{lo}, {hi}]"
    rows, cols = q.shape
    u = q.to(torch.int64) - lo
    if 32 % bits:
        return _to_int32_words(_pack_straddling(u, bits)).contiguous()
    per_word = 32 // bits
    pad = (-cols) % per_word
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(rows, -1, per_word)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=q.device)
    return _to_int32_words((u << shifts).sum(dim=2)).contiguous()  # disjoint bits: the sum is an or


def _pack_straddling(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes int64 [N, K] → int64 words [N, ceil(K·b/32)] for a b that does not divide 32:
    every 32 codes fill exactly b words."""
    rows, cols = u.shape
    words = -(-cols * bits // 32)
    u = torch.nn.functional.pad(u, (0, (-cols) % 32)).reshape(rows, -1, 32)
    out = torch.zeros(rows, u.shape[1], bits, dtype=torch.int64, device=u.device)
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        out[..., word] |= (u[..., i] << offset) & 0xFFFFFFFF
        if offset + bits > 32:
            out[..., word + 1] |= u[..., i] >> (32 - offset)
    return out.reshape(rows, -1)[:, :words]


def unpack_int(packed: torch.Tensor, cols: int, bits: int = 4) -> torch.Tensor:
    """int32 [N, ceil(cols·b/32)] → signed codes int8 [N, cols]; exact inverse of :func:`pack_int`."""
    assert 2 <= bits <= 8, bits
    assert packed.dim() == 2 and packed.dtype == torch.int32, (packed.shape, packed.dtype)
    assert packed.shape[1] == -(-cols * bits // 32), (packed.shape, cols)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if 32 % bits:
        rows = packed.shape[0]
        groups = -(-cols // 32)
        words = torch.nn.functional.pad(words, (0, groups * bits - words.shape[1])).reshape(rows, groups, bits)
        u = torch.zeros(rows, groups, 32, dtype=torch.int64, device=packed.device)
        for i in range(32):
            word, offset = divmod(i * bits, 32)
            value = words[..., word] >> offset
            if offset + bits > 32:
                value = value | (words[..., word + 1] << (32 - offset))
            u[..., i] = value & (2 ** bits - 1)
        return (u.reshape(rows, -1)[:, :cols] - 2 ** (bits - 1)).to(torch.int8)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=packed.device)
    u = (words.unsqueeze(2) >> shifts) & (2 ** bits - 1)
    return (u.reshape(packed.shape[0], -1)[:, :cols] - 2 ** (bits - 1)).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed codes int8 [N, K] in [-8, 7] → int32 [N, ceil(K/8)] (layout in the module docstring)."""
    return pack_int(q, 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [N, ceil(cols/8)] → signed codes int8 [N, cols]; exact inverse of :func:`pack_int4`."""
    return unpack_int(packed, cols, 4)


def _nonzero(w: torch.Tensor) -> torch.Tensor:
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16):
        return w.float() != 0  # -0.0 counts as zero (doc §3.4: canonicalize zeros)
    return w != 0


def is_24_sparse(w: torch.Tensor) -> bool:
    """True when K % 4 == 0 and every group of four consecutive input columns has ≤ 2 non-zeros."""
    if w.dim() != 2 or w.shape[1] % 4 or w.numel() == 0:
        return False
    rows, cols = w.shape
    return bool((_nonzero(w).reshape(rows, cols // 4, 4).sum(dim=2) <= 2).all())


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense-with-zeros [N, K] (any dtype) → (values [N, K/2] same dtype, meta int32 [N, ceil(K/32)])."""
    assert w.dim() == 2 and w.shape[1] % 4 == 0, f"2:4 needs in-features divisible by 4, got {tuple(w.shape)}"
    rows, cols = w.shape
    nz = _nonzero(w).reshape(rows, cols // 4, 4)
    if bool((nz.sum(dim=2) > 2).any()):
        raise ValueError("weight is not 2:4 sparse: a group of 4 input columns holds more than 2 non-zeros")
    pos = torch.arange(4, device=w.device)
    # Non-zeros first, then the lowest positions; keep two and put them in increasing order.
    key = (~nz).to(torch.int64) * 4 + pos
    keep = key.argsort(dim=2)[:, :, :2].sort(dim=2).values  # [N, K/4, 2]
    base = (torch.arange(cols // 4, device=w.device) * 4).view(1, -1, 1)
    flat_idx = (base + keep).reshape(rows, cols // 2)
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        values = w.view(torch.uint8).gather(1, flat_idx).view(w.dtype)  # gather has no fp8 kernel on CPU
    else:
        values = w.gather(1, flat_idx)
    idx = keep.reshape(rows, cols // 2).to(torch.int64)
    pad = (-idx.shape[1]) % META_PER_WORD
    if pad:
        idx = torch.nn.functional.pad(idx, (0, pad))
    shifts = torch.arange(0, 32, 2, dtype=torch.int64, device=w.device)
    meta = _to_int32_words((idx.reshape(rows, -1, META_PER_WORD) << shifts).sum(dim=2))
    return values.contiguous(), meta.contiguous()


def meta_positions(meta: torch.Tensor, half_cols: int) -> torch.Tensor:
    """meta int32 [N, ceil(K/32)] → kept positions int64 [N, K/2] (0..3 inside each group of four)."""
    words = meta.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 2, dtype=torch.int64, device=meta.device)
    return ((words.unsqueeze(2) >> shifts) & 3).reshape(meta.shape[0], -1)[:, :half_cols]


def decompress_24(values: torch.Tensor, meta: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`compress_24`: (values [N, K/2], meta) → dense [N, K] in values' dtype."""
    rows, half = values.shape
    assert half * 2 == cols, (values.shape, cols)
    pos = meta_positions(meta, half)
    target = (torch.arange(half, device=values.device) // 2 * 4).view(1, -1) + pos
    if values.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        dense = torch.zeros(rows, cols, dtype=torch.uint8, device=values.device)
        return dense.scatter_(1, target, values.view(torch.uint8)).view(values.dtype)
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, target, values)
