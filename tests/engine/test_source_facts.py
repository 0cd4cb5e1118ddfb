"""The source checkpoint's dtype, size and metadata, as the export, the size table and the card use them."""
import json

import torch

from compression.model_io.loading import ModelSource
from compression.model_io.source_facts import (metadata_from_card, parameters_bytes, source_checkpoint_bytes,
                                      source_dtype, source_metadata)
from compression.units import format_bytes
from tests.tiny import tiny_llama

CARD = """---
license: apache-2.0
language:
- en
- fr
---
# Some model

## Intended Uses

Chat assistants and
summarisation in English.

## Limitations
Not for medical advice.
"""


def test_metadata_from_a_model_card():
    meta = metadata_from_card(CARD)
    assert meta == {"license": "apache-2.0", "license_link": None, "language": ["en", "fr"],
                    "intended_use": "Chat assistants and summarisation in English."}
    assert metadata_from_card("# no front matter")["license"] is None


def test_local_source_dtype_size_and_metadata(tmp_path):
    model = tiny_llama(vocab=512)
    model.save_pretrained(tmp_path, safe_serialization=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "README.md").write_text(CARD)
    source = ModelSource("local", str(tmp_path))
    assert source_dtype(source, model) == torch.bfloat16
    on_disk = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert source_checkpoint_bytes(source, model, torch.bfloat16) == on_disk
    assert source_metadata(source)["language"] == ["en", "fr"]


def test_demo_source_is_the_bf16_hub_model_and_its_gguf_header_names_licence_and_language():
    model = tiny_llama(vocab=512)
    assert source_dtype(ModelSource("demo", "demo"), model) == torch.bfloat16
    n = sum(p.numel() for p in model.parameters())
    assert parameters_bytes(model, torch.bfloat16) == 2 * n == source_checkpoint_bytes(
        ModelSource("demo", "demo"), model, torch.bfloat16)
    meta = source_metadata(ModelSource("demo", "demo"))
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]


def test_one_unit_everywhere():
    assert format_bytes(269_060_000) == "269.1 MB" and format_bytes(1_420_000_000) == "1.42 GB"
