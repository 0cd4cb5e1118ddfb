"""The load-time layouts agree bit for bit with packers written from the documentation."""
from __future__ import annotations


import pytest
import torch

from kernels.packing import (compress_24, decompress_24, is_24_sparse, meta_positions, pack_int, pack_int4, unpack_int,
                             unpack_int4)
from tests.kernels.helpers import meta_by_hand, pack_int4_by_hand, random_24_mask


@pytest.mark.parametrize("cols", [8, 40, 61, 129])
def test_int4_packing_matches_the_documented_layout_bit_for_bit(cols: int) -> None:
    g = torch.Generator().manual_seed(cols)
    q = torch.randint(-8, 8, (17, cols), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert torch.equal(packed, pack_int4_by_hand(q))
    assert torch.equal(unpack_int4(packed, cols), q)
    assert (packed < 0).any(), "words with a top nibble ≥ 8 must read as negative int32"


def test_the_engine_exports_with_the_one_packer_the_kernels_read() -> None:
    import compression.model_io.export
    import compression.algorithms.quant

    assert compression.model_io.export.pack_int is pack_int
    assert not hasattr(compression.algorithms.quant, "pack_int") and not hasattr(compression.algorithms.quant, "check_24_pattern")
    g = torch.Generator().manual_seed(3)
    q8 = torch.randint(-128, 128, (24, 20), generator=g, dtype=torch.int8)
    assert torch.equal(unpack_int(pack_int(q8, 8), 20, 8), q8)  # W8 weight-only, 4 codes per word
    q4 = torch.randint(-8, 8, (24, 136), generator=g, dtype=torch.int8)
    assert torch.equal(pack_int(q4, 4), pack_int4(q4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8])
def test_compact_24_round_trips_and_matches_the_documented_meta(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    rows, cols = 9, 72
    dense = torch.randn(rows, cols, generator=g) * 4
    dense = dense * random_24_mask(rows, cols, g)
    dense[0, :4] = 0  # a group with no non-zeros keeps two zeros
    dense[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 3.0])  # and one with a single non-zero
    w = dense.round().clamp(-8, 7).to(dtype) if dtype == torch.int8 else dense.to(dtype)
    assert is_24_sparse(w)
    values, meta = compress_24(w)
    assert values.shape == (rows, cols // 2) and meta.shape == (rows, -(-cols // 32))
    positions = meta_positions(meta, cols // 2)
    assert torch.equal(meta, meta_by_hand(positions))
    assert (positions[:, 0::2] < positions[:, 1::2]).all(), "i0 < i1 inside each group"
    restored = decompress_24(values, meta, cols)
    # Values compare equal; dropped -0.0 entries come back as +0.0 (canonical zeros).
    assert restored.dtype == dtype and torch.equal(restored.float(), w.float())


def test_it_rejects_weights_that_are_not_24_sparse() -> None:
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    assert not is_24_sparse(w)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        compress_24(w)
