"""Pure quantize/dequantize/pack functions."""
import pytest
import torch

from compression.algorithms.quant import (FP8_DTYPE, QuantArgs, compute_scale, dequantize, fake_quantize, minmax_scale,
                               quantize)
from kernels.packing import is_24_sparse as check_24_pattern, pack_int, pack_int4, unpack_int, unpack_int4

INT4_G32 = QuantArgs(num_bits=4, type="int", strategy="group", group_size=32)


def test_int4_group_codes_stay_on_the_grid_and_dequantize_to_code_times_scale():
    w = torch.randn(16, 128)
    scale = minmax_scale(w, INT4_G32)
    assert scale.shape == (16, 4)
    q = quantize(w, scale, INT4_G32)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    deq = dequantize(q, scale)
    assert torch.equal(deq, q.float() * scale.repeat_interleave(32, dim=1))
    # symmetric int4 scale is absmax / 7.5 per group
    assert torch.allclose(scale[:, 0], w[:, :32].abs().amax(dim=1) / 7.5)


def test_fp8_channel_quantization_is_representable_and_scaled_by_absmax_over_448():
    w = torch.randn(8, 64) * 3
    args = QuantArgs(num_bits=8, type="float", strategy="channel")
    scale = minmax_scale(w, args)
    assert torch.allclose(scale.squeeze(1), w.abs().amax(dim=1) / 448)
    q = quantize(w, scale, args)
    assert q.dtype == FP8_DTYPE
    deq = fake_quantize(w, scale, args)
    assert torch.equal(deq, q.float() * scale)
    assert (deq - w).abs().max() < 0.07 * w.abs().max()


def test_mse_observer_never_has_a_larger_error_norm_than_minmax():
    w = torch.randn(32, 128)
    w[0, 0] = 40.0  # an outlier that minmax wastes range on
    for args in (QuantArgs(num_bits=4, strategy="channel", observer="mse"),
                 QuantArgs(num_bits=8, type="float", strategy="channel", observer="mse")):
        wide = QuantArgs(**{**args.to_dict(), "observer_kwargs": {"grid": 20, "maxshrink": 0.8, "patience": 1000}})
        e_mm = (fake_quantize(w, minmax_scale(w, args), args) - w).abs().pow(2.4).sum(dim=1)
        for observed in (args, wide):
            e_mse = (fake_quantize(w, compute_scale(w, observed), args) - w).abs().pow(2.4).sum(dim=1)
            assert (e_mse <= e_mm + 1e-6).all()
        # the wide search: absmax·(1 - i/20) for i < 16, the best per row (a plain loop, first best wins)
        absmax = w.abs().amax(dim=1, keepdim=True)
        best, best_err = None, torch.full_like(absmax, float("inf"))
        for i in range(16):
            candidate = absmax * (1 - i / 20) / (448 if args.type == "float" else 7.5)
            err = (fake_quantize(w, candidate, args) - w).abs().pow(2.4).sum(dim=1, keepdim=True)
            best = candidate if best is None else torch.where(err < best_err, candidate, best)
            best_err = torch.minimum(err, best_err)
        assert torch.equal(compute_scale(w, wide), best)


def test_zero_scales_are_replaced_by_eps():
    scale = minmax_scale(torch.zeros(4, 64), INT4_G32)
    assert (scale > 0).all()


def test_int4_packing_round_trips_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    for cols in (8, 64, 17, 129):
        q = torch.randint(-8, 8, (5, cols), generator=gen, dtype=torch.int8)
        packed = pack_int4(q)
        assert packed.dtype == torch.int32 and packed.shape == (5, -(-cols // 8))
        assert torch.equal(unpack_int4(packed, cols), q)


def test_int4_packing_puts_the_lowest_column_in_the_lowest_nibble():
    q = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, 7]], dtype=torch.int8)  # u = 0..6, 15
    word = int(pack_int4(q)[0, 0]) & 0xFFFFFFFF
    assert word == 0xF6543210
    assert int(pack_int4(q)[0, 0]) < 0  # top nibble ≥ 8 → negative int32


def test_int8_packing_round_trips_four_values_per_word():
    q = torch.randint(-128, 128, (3, 20), dtype=torch.int8)
    packed = pack_int(q, 8)
    assert packed.shape == (3, 5)
    assert torch.equal(unpack_int(packed, 20, 8), q)
    assert int(pack_int(torch.tensor([[-128, -127, 0, 127]], dtype=torch.int8), 8)[0, 0]) & 0xFFFFFFFF == 0xFF800100


def test_packing_rejects_codes_off_the_int4_grid():
    with pytest.raises(AssertionError):
        pack_int4(torch.tensor([[8] * 8], dtype=torch.int8))


def test_24_pattern_check_counts_nonzeros_per_group_of_four():
    assert check_24_pattern(torch.tensor([[1.0, 0, 0, 2, 0, 0, 3, 0]]))
    assert not check_24_pattern(torch.tensor([[1.0, 1, 1, 0]]))
    assert not check_24_pattern(torch.ones(2, 6))


