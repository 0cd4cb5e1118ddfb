"""The demo model's dequantized weights are cached once as a plain safetensors checkpoint: later loads
(other jobs, other processes) read that instead of parsing the GGUF file again, and get the same model.

Parsing the real GGUF file takes ~20 s on two cores, so the cold path is exercised with a tiny Llama
standing in for what the GGUF load returns; one test loads the real demo model through the suite's
shared cache (warm after the first demo load of a run)."""
import pytest
import torch

from compression.model_io import loading
from tests.tiny import tiny_llama


def _fake_gguf(monkeypatch, model) -> list[dict]:
    """from_pretrained(..., gguf_file=...) returns ``model`` (and is recorded); other calls run for real."""
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained.__func__
    reads: list[dict] = []

    def from_pretrained(cls, *args, **kwargs):
        if "gguf_file" in kwargs:
            reads.append(kwargs)
            return model
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    return reads


def _stand_in():
    model = tiny_llama()
    model.config.tie_word_embeddings = True  # tied like SmolLM2
    model.tie_weights()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": loading.DEMO_GGUF, "dequantize": False}
    return model


def test_the_first_load_caches_the_weights_and_the_next_reads_them_without_the_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv(loading.CONFIG_CACHE_ENV, str(tmp_path))
    stand_in = _stand_in()
    expected = {k: v.clone() for k, v in stand_in.state_dict().items()}
    reads = _fake_gguf(monkeypatch, stand_in)

    first = loading._demo_model(torch.float32)
    assert len(reads) == 1 and reads[0]["dtype"] == torch.float32  # cached in float32 whatever was asked
    (cache,) = tmp_path.glob("demo-weights-*")
    assert sorted(p.name for p in cache.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))
    assert "quantization_config" not in (cache / "config.json").read_text()  # plain float weights now
    assert first is not stand_in  # the job gets the cached copy, as every later job will
    assert first.lm_head.weight.data_ptr() == first.model.embed_tokens.weight.data_ptr()  # still tied
    assert all(torch.equal(t, expected[k]) for k, t in first.state_dict().items())
    assert first.config._name_or_path == str(loading.demo_model_dir())

    second = loading._demo_model(torch.bfloat16)
    assert len(reads) == 1, "read the GGUF file again"
    assert second.dtype == torch.bfloat16
    assert all(torch.equal(t, expected[k].to(torch.bfloat16)) for k, t in second.state_dict().items())


def test_without_a_cache_directory_the_gguf_file_is_read_every_time(monkeypatch):
    monkeypatch.delenv(loading.CONFIG_CACHE_ENV, raising=False)
    stand_in = _stand_in()
    reads = _fake_gguf(monkeypatch, stand_in)
    assert loading._demo_model(torch.bfloat16) is stand_in and loading._demo_model(torch.bfloat16) is stand_in
    assert [r["dtype"] for r in reads] == [torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("damage", ["truncated", "not safetensors"])
def test_a_damaged_cache_is_rebuilt_from_the_gguf_file(tmp_path, monkeypatch, damage):
    monkeypatch.setenv(loading.CONFIG_CACHE_ENV, str(tmp_path))
    cache = tmp_path / f"demo-weights-{loading._fingerprint(loading.demo_model_dir() / loading.DEMO_GGUF)}"
    stand_in = _stand_in()
    loading._save_plain_checkpoint(stand_in, cache)
    weights = cache / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100] if damage == "truncated" else b"not a checkpoint")
    reads = _fake_gguf(monkeypatch, stand_in)
    model = loading._demo_model(torch.float32)
    assert len(reads) == 1
    assert all(torch.equal(t, stand_in.state_dict()[k]) for k, t in model.state_dict().items())
    again = loading._demo_model(torch.float32)
    assert len(reads) == 1 and again is not stand_in  # the rebuilt cache serves the next load


def test_the_real_demo_model_loads_the_same_from_the_shared_cache(monkeypatch):
    """Through the suite's shared cache directory (what every job of the test run uses)."""
    import os

    assert os.environ.get(loading.CONFIG_CACHE_ENV), "the app sets the cache directory at start-up"
    first = loading.load_model("demo")
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained.__func__

    def no_gguf(cls, *args, **kwargs):
        assert "gguf_file" not in kwargs, "parsed the GGUF file again"
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(no_gguf))
    second = loading.load_model("demo")
    assert second.identity == first.identity and first.identity["name"] == loading.DEMO_REPO_ID
    assert not hasattr(second.model.config, "quantization_config")
    a, b = first.model.state_dict(), second.model.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert second.model.config.hidden_size == 576 and second.model.config.tie_word_embeddings
