"""The in-memory path holds no second copy of the weights: compressed weights go into the loaded
parameters' own storage, and the export streams each tensor from its memory into the shard."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compression.model_io.export import _writable, export_checkpoint, save_safetensors
from compression.recipe import Recipe
from compression.sequential import compress_model


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
            "codes": torch.randn(4, 4, generator=gen).to(torch.float8_e4m3fn),
            "g_idx": torch.arange(7, dtype=torch.int32), "empty": torch.zeros(0, 3),
            "flags": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "packed": torch.arange(3, dtype=torch.uint8)}


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_own_writer_reads_back_like_save_file(tmp_path):
    tensors = _tensors()
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    assert ours.keys() == theirs.keys() == tensors.keys()
    for name, t in tensors.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape
        assert _bytes(ours[name]) == _bytes(t) == _bytes(theirs[name])
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    raw = (tmp_path / "ours.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    header = json.loads(raw[8:8 + length])
    for name, entry in header.items():  # every tensor's data starts aligned to its element size
        if name != "__metadata__":
            assert entry["data_offsets"][0] % tensors[name].element_size() == 0


def test_writable_copies_only_what_it_must():
    plain = torch.randn(8, 8)
    assert _writable(plain, None).data_ptr() == plain.data_ptr()
    signed_zero = torch.tensor([1.0, -0.0, 2.0])
    out = _writable(signed_zero, None)
    assert out.data_ptr() != signed_zero.data_ptr() and not torch.signbit(out[1])
    whole = torch.randn(4, 6)
    view = whole[1:3]
    out = _writable(view, None)
    assert torch.equal(out, view) and out.untyped_storage().nbytes() == out.numel() * out.element_size()
    assert _writable(plain, torch.bfloat16).dtype == torch.bfloat16


def test_compression_writes_into_the_loaded_parameters(model, calibration):
    linear = model.model.layers[0].mlp.down_proj
    before = linear.weight.data_ptr()
    original = linear.weight.detach().clone()
    compress_model(model, Recipe.from_preset("W4A16", group_size=32), calibration)
    assert linear.weight.data_ptr() == before  # same storage ...
    assert not torch.equal(linear.weight, original)  # ... holding the quantized values


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "2:4"])
def test_export_matches_safetensors_reference(model, calibration, tmp_path, preset):
    recipe = Recipe.from_preset(preset)
    report = compress_model(model, recipe, calibration)
    info = export_checkpoint(model, None, recipe, report, tmp_path / "out")
    shards = [f for f in info["files"] if f.endswith(".safetensors")]
    state = {}
    for shard in shards:
        state.update(load_file(tmp_path / "out" / shard))
    assert "model.layers.0.mlp.down_proj.weight" in state or "model.layers.0.mlp.down_proj.weight_packed" in state
    for name, tensor in state.items():  # no -0.0 reaches the file (vLLM's 2:4 check counts zeros by bits)
        if tensor.is_floating_point() and tensor.element_size() > 1:
            assert not bool((torch.signbit(tensor) & (tensor == 0)).any()), name
