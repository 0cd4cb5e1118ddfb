"""Host-memory savings of the sequential path that must not change a result: one flat activation buffer
written over by each layer's outputs, one copy of equal per-layer arguments, int codes held packed."""
import torch

from compression.algorithms.quant import QuantArgs
from compression.model_io.walk import LayerInputs, _same_arguments
from compression.sequential import ModuleRecord


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, hidden, scale=None):
        return torch.tanh(self.linear(hidden)) * scale


def _inputs():
    torch.manual_seed(0)
    hidden = [torch.randn(1, 5, 8) for _ in range(4)] + [torch.randn(1, 3, 8)]
    scale = torch.tensor(2.0)
    calls = [[{"scale": scale}] for _ in hidden]
    return LayerInputs(hidden, calls, keys=[5, 5, 5, 5, 3])


@torch.no_grad()
def test_outputs_written_over_the_inputs_equal_fresh_outputs():
    layer = _Layer()
    fresh = _inputs().forward(layer, 0)
    inputs = _inputs().consolidate()
    flat = inputs.hidden[0].untyped_storage().data_ptr()
    assert all(h.untyped_storage().data_ptr() == flat for h in inputs.hidden)  # one buffer
    out = inputs.forward(layer, 0, in_place=True)
    assert all(torch.equal(a, b) for a, b in zip(out, fresh))
    assert all(o.untyped_storage().data_ptr() == flat for o in out)  # no second set allocated


def test_equal_arguments_are_recognised_and_different_ones_are_not():
    a = {"pos": (torch.ones(2), torch.zeros(2)), "flag": False}
    assert _same_arguments(a, {"pos": (torch.ones(2), torch.zeros(2)), "flag": False}, {})
    assert not _same_arguments(a, {"pos": (torch.ones(2), torch.ones(2)), "flag": False}, {})
    assert not _same_arguments(a, {"pos": (torch.ones(2, dtype=torch.float64), torch.zeros(2)), "flag": False}, {})


def test_int4_codes_are_held_packed_and_read_back_exactly():
    codes = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    record = ModuleRecord("m", (16, 64), weights=QuantArgs(num_bits=4, strategy="group", group_size=32))
    record.codes = codes
    assert record.packed is not None and record.packed.dtype == torch.int32 and record.packed.shape == (16, 8)
    assert torch.equal(record.codes, codes)
    record.codes = None
    assert record.codes is None and record.packed is None
    fp8 = ModuleRecord("f", (4, 4), weights=QuantArgs(num_bits=8, type="float"))
    fp8.codes = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    assert fp8.packed is None and fp8.codes.dtype == torch.float8_e4m3fn
