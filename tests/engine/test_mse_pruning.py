"""The MSE / imatrix observer search scores a candidate in full only where a lower bound (its error on
an entry's largest weights) still leaves room to win: the pruned search must pick exactly the scales
(and zero points) of the search that scores every candidate on every weight."""
import pytest
import torch

from compression.algorithms.quant import PRUNE_WIDTH, QuantArgs, _mse_search, observe


def _weight(rows: int, cols: int) -> torch.Tensor:
    torch.manual_seed(11)
    w = torch.randn(rows, cols) * torch.rand(rows, 1) * 0.05
    w[:, :3] *= 25  # outlier input channels: the rows where shrinking the range wins
    w[4, 100] = 3.0
    return w


CASES = {
    "FP8 channel (FP8_DYNAMIC preset kwargs)": QuantArgs(num_bits=8, type="float", strategy="channel", observer="mse",
                                                         observer_kwargs={"grid": 20, "maxshrink": 0.8, "patience": 1000}),
    "FP8 channel, llm-compressor defaults (patience 5)": QuantArgs(num_bits=8, type="float", observer="mse"),
    "INT8 channel asymmetric": QuantArgs(num_bits=8, symmetric=False, strategy="channel", observer="mse"),
    "INT4 group 128": QuantArgs(num_bits=4, strategy="group", group_size=128, observer="mse",
                                observer_kwargs={"grid": 20, "maxshrink": 0.8, "patience": 1000}),
    "INT4 group 128 asymmetric, imatrix": QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=128,
                                                    observer="imatrix_mse"),
    "INT8 channel, imatrix": QuantArgs(num_bits=8, strategy="channel", observer="imatrix_mse"),
    "FP8 128x128 blocks (padded)": QuantArgs(num_bits=8, type="float", strategy="block", block_structure=(128, 128),
                                             observer="mse", observer_kwargs={"grid": 20, "maxshrink": 0.8}),
    "INT4 group 32 (never pruned)": QuantArgs(num_bits=4, strategy="group", group_size=32, observer="mse"),
}


@pytest.mark.parametrize("name", CASES)
def test_pruned_search_equals_the_full_search(name):
    args = CASES[name]
    w = _weight(200, 384)
    importance = torch.rand(384) * 4 + 0.01
    lo, hi = observe(w, args)
    for dtype in (torch.bfloat16, torch.float32):
        full = _mse_search(w, args, dtype, lo, hi, None, importance, prune=False)
        pruned = _mse_search(w, args, dtype, lo, hi, None, importance, prune=True)
        assert full[0].dtype == pruned[0].dtype == dtype and full[0].shape == lo.shape
        assert torch.equal(full[0], pruned[0]), name
        assert (full[1] is None) == (pruned[1] is None) == args.symmetric
        if full[1] is not None:
            assert torch.equal(full[1], pruned[1]), name


def test_the_search_shrinks_gaussian_rows_and_keeps_the_full_range_of_two_level_rows():
    """Not a tautology of the equality above: the search really chooses (both ways), per row."""
    args = QuantArgs(num_bits=4, strategy="channel", observer="mse",
                     observer_kwargs={"grid": 20, "maxshrink": 0.8, "patience": 1000})
    torch.manual_seed(0)
    w = torch.randn(64, 256)  # Gaussian rows: clipping the tails pays for a finer grid
    w[:8] = torch.where(torch.rand(8, 256) < 0.5, -1.0, 1.0)  # ±1 only: exact at full range, shrinking hurts
    lo, hi = observe(w, args)
    assert w.shape[1] > PRUNE_WIDTH  # the pruned path
    scale, _ = _mse_search(w, args, torch.float32, lo, hi, None)
    full_range = torch.maximum(-lo, hi) / 7.5
    assert torch.allclose(scale[:8], full_range[:8])
    assert (scale[8:] < full_range[8:] * 0.99).float().mean() > 0.9  # most Gaussian rows clip their tails
