"""Streaming (compression/model_io/streaming.py): decoder layers read lazily from the safetensors
shards, compressed and written shard by shard. The streamed job must produce the same checkpoint as
the in-memory one, hold at most one decoder layer at a time, and refuse what it cannot do."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compression.model_io.streaming import MemoryPlanError, ShardReader, load_streamed, plan_memory
from compression.pipeline import run_job
from compression.recipe import Recipe
from tests.engine.conftest import random_calibration, same_module_records
from tests.tiny import demo_tokenizer, save_tiny_llama, tiny_family_model

DEMO_VOCAB = 49152  # the demo tokenizer's, which the jobs below calibrate with

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# W4A16 with group 32 (the tiny families' expert width is 32) and the routers left 16-bit
MOE_W4A16 = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: [lm_head, 're:.*mlp.gate$', 're:.*block_sparse_moe.gate$']
      config_groups:
        g: {targets: [Linear], weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 32}}
"""


def _spec(model_dir: Path, preset: str, streaming: str, **extra) -> dict:
    return {"job_id": "s", "model": str(model_dir), "recipe": Recipe.from_preset(preset).to_dict(),
            "allowed_roots": [str(model_dir.parent)], "evaluation": {"tasks": [], "speed": False},
            "streaming": streaming, "calibration": {"source": "builtin:chat-v1", "samples": 4, "seqlen": 32},
            "device": "cpu", **extra}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", layers=3)


@pytest.mark.parametrize("preset", ["W4A16", "2:4+W4A16", "FP8+KV_FP8"])
def test_streamed_job_writes_the_same_checkpoint_as_the_in_memory_job(model_dir, tmp_path, preset):
    torch.manual_seed(0)
    dense = run_job(_spec(model_dir, preset, "never"), tmp_path / "dense")
    torch.manual_seed(0)
    streamed = run_job(_spec(model_dir, preset, "always"), tmp_path / "streamed")
    assert dense["memory"]["mode"] == "in-memory" and streamed["memory"]["mode"] == "streaming"
    for name in ("model.safetensors.index.json", "config.json", "recipe.yaml"):
        assert (tmp_path / "dense" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name
    shards = sorted(p.name for p in (tmp_path / "dense").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors"))
    for shard in shards:  # one shard each: the same tensors, hence the very same bytes
        assert (tmp_path / "dense" / shard).read_bytes() == (tmp_path / "streamed" / shard).read_bytes()
    assert streamed["compression"]["modules"] == dense["compression"]["modules"]
    assert streamed["evaluation"]["compressed_runtime"].startswith("not loaded")


def test_layers_are_read_one_at_a_time_and_released(model_dir, tmp_path):
    from compression.sequential import compress_model

    streamed = load_streamed(model_dir, dtype=torch.float32)
    layers = streamed.layers
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert streamed.model.get_input_embeddings().weight.device.type == "cpu"
    resident: list[int] = []

    def watch(event: dict) -> None:
        resident.append(sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers))

    streamed.begin_export(tmp_path / "out", torch.float32, max_shard_bytes=200_000)  # several shards
    report = compress_model(streamed.model, Recipe.from_preset("W4A16"), random_calibration(2, 16),
                            progress=watch, layer_io=streamed)
    assert resident and max(resident) == 1  # never more than the layer being compressed
    assert streamed.loads == len(layers)
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert all(r.codes is None and r.written for r in report.modules.values())  # codes left with their shard
    exported = streamed.finish_export(None, Recipe.from_preset("W4A16"), report)
    shards = [f for f in exported["files"] if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    written = _tensors(tmp_path / "out")
    assert set(index["weight_map"]) == set(written)
    assert "model.layers.2.mlp.down_proj.weight_packed" in written and "lm_head.weight" in written
    assert not list((tmp_path / "out").glob(".part-*"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]


def test_lazy_layers_give_the_same_logits_as_the_loaded_model(model_dir):
    from transformers import AutoModelForCausalLM

    ids = random_calibration(1, 12)[0]["input_ids"]
    whole = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    streamed = load_streamed(model_dir, dtype=torch.float32)
    with torch.no_grad(), streamed.lazy_layers("cpu") as model:
        logits = model(input_ids=ids).logits
    assert torch.equal(logits, whole(input_ids=ids).logits)
    assert all(p.device.type == "meta" for p in streamed.layers.parameters())
    assert streamed.loads == len(streamed.layers)


@pytest.mark.parametrize("family", ["mixtral", "llama4_text"])
def test_lazy_moe_layers_give_the_loaded_models_logits(family, tmp_path):
    """Evaluation of a streamed MoE model (baseline perplexity, lm-eval) runs the split experts layer by layer:
    the logits of the fused model transformers loads (per-expert tensors on disk, or fused ones cut)."""
    from transformers import AutoModelForCausalLM

    directory = _save_moe(family, tmp_path / family)
    ids = random_calibration(1, 12)[0]["input_ids"]
    whole = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    streamed = load_streamed(directory, dtype=torch.float32)
    with torch.no_grad(), streamed.lazy_layers("cpu") as model:
        logits = model(input_ids=ids).logits
    with torch.no_grad():
        assert torch.allclose(logits, whole(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert all(p.device.type == "meta" for p in streamed.layers.parameters())


def test_shard_reader_reads_single_tensors_from_an_indexed_checkpoint(model_dir):
    reader = ShardReader(model_dir)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert name in reader and reader.headers()[name][0] == [128, 128]
    tensor = reader.read([name], torch.float32)[name]
    assert tensor.shape == (128, 128) and tensor.dtype == torch.float32


def _save_moe(family: str, directory: Path) -> Path:
    if family in ("gpt_oss", "llama4_text"):
        from tests.engine.test_more_families import _model

        model = _model(family, vocab_size=DEMO_VOCAB)
    else:
        model = tiny_family_model(family, vocab_size=DEMO_VOCAB)
    model.save_pretrained(directory, safe_serialization=True)
    demo_tokenizer().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "llama4_text", "gpt_oss"])
def test_moe_models_stream_expert_by_expert_and_write_the_in_memory_checkpoint(family, tmp_path):
    """transformers fuses MoE experts in memory; most checkpoints (the Hub's, save_pretrained's) store them
    one by one, Llama 4's and gpt-oss's fused. Streaming splits the meta skeleton's experts and reads each
    layer's experts by their stored names (Mixtral's block_sparse_moe.experts.N.w1 ... through the rename),
    or cuts them from the fused tensors (transposed [E, H, 2I] for Llama 4, gate/up interleaved and biased
    for gpt-oss) -- the same checkpoint as the in-memory job, byte for byte."""
    directory = _save_moe(family, tmp_path / "models" / family)
    streamed = load_streamed(directory, dtype=torch.float32)
    assert all(p.device.type == "meta" for p in streamed.layers.parameters())
    recipe = Recipe.from_yaml(MOE_W4A16).to_dict()
    torch.manual_seed(0)
    dense = run_job(_spec(directory, "W4A16", "never", recipe=recipe), tmp_path / "dense")
    torch.manual_seed(0)
    stream = run_job(_spec(directory, "W4A16", "always", recipe=recipe), tmp_path / "streamed")
    assert dense["memory"]["mode"] == "in-memory" and stream["memory"]["mode"] == "streaming"
    written, reference = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "dense")
    assert set(written) == set(reference)
    experts = [n for n in written if ".experts.1." in n and n.endswith("weight_packed")]
    assert len(experts) == 3 * (2 if family != "deepseek_v3" else 1), sorted(written)[:20]
    if family == "mixtral":
        assert all(".block_sparse_moe." in n for n in experts)
    for name, tensor in reference.items():
        assert torch.equal(written[name], tensor), name
    assert same_module_records(stream["compression"]["modules"], dense["compression"]["modules"])


def _quantized_experts(directory: Path) -> Path:
    """A gpt-oss checkpoint whose experts are stored as the Hub's are: MXFP4 blocks, no 16-bit tensor."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name + "_blocks"] = tensors.pop(name).to(torch.uint8)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return directory


def test_experts_stored_in_neither_form_are_refused_in_streaming_mode(tmp_path):
    directory = _quantized_experts(_save_moe("gpt_oss", tmp_path / "models" / "gpt_oss"))
    with pytest.raises(MemoryPlanError) as err:
        load_streamed(directory, dtype=torch.float32)
    assert err.value.field == "model" and "neither per-expert MoE tensors nor 16-bit fused" in err.value.message
    assert "experts.0." in err.value.message  # the per-expert tensor it looked for


def _no_output(tmp_path: Path, name: str) -> None:
    assert not (tmp_path / name).exists()
    assert not list(tmp_path.glob(f".tmp-{name}-*"))


def test_a_model_too_large_for_the_host_budget_is_refused_before_any_work(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_HOST_MEMORY_BYTES", str(50 * 2 ** 20))
    events = []
    with pytest.raises(MemoryPlanError) as err:
        run_job(_spec(model_dir, "W4A16", "auto"), tmp_path / "out", progress=events.append)
    assert err.value.field == "COMPRESSOR_HOST_MEMORY_BYTES"
    assert "streamed layer by layer it still needs" in err.value.message
    assert not any(e.get("stage") == "compress" for e in events)
    _no_output(tmp_path, "out")


def test_too_many_calibration_samples_for_the_host_name_calibration_samples(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_HOST_MEMORY_BYTES", str(4 * 2 ** 30))
    spec = _spec(model_dir, "W4A16", "auto")
    spec["calibration"] = {"source": "builtin:chat-v1", "samples": 100_000, "seqlen": 512}
    with pytest.raises(MemoryPlanError) as err:
        run_job(spec, tmp_path / "out")
    assert err.value.field == "calibration.samples"
    assert "100000 samples" in err.value.message and "use at most" in err.value.message
    _no_output(tmp_path, "out")


def test_always_streaming_a_source_that_cannot_stream_is_refused(tmp_path):
    directory = _quantized_experts(_save_moe("gpt_oss", tmp_path / "models" / "gpt_oss"))
    with pytest.raises(MemoryPlanError) as err:
        run_job(_spec(directory, "FP8_DYNAMIC", "always"), tmp_path / "out")
    assert err.value.field == "COMPRESSOR_STREAMING" and "neither per-expert" in err.value.message
    _no_output(tmp_path, "out")


class _Report:
    def __init__(self, host_mb, streaming_mb, device_mb=100.0, activation_mb=10.0):
        self.peak_host_mb, self.peak_host_streaming_mb = host_mb, streaming_mb
        self.peak_device_mb, self.activation_mb = device_mb, activation_mb


MB = 2 ** 20


def test_auto_streams_only_when_the_in_memory_plan_does_not_fit():
    assert plan_memory(_Report(800, 300), device="cpu", host_bytes=1000 * MB).mode == "in-memory"
    plan = plan_memory(_Report(1200, 300), device="cpu", host_bytes=1000 * MB)
    assert plan.mode == "streaming" and "exceeds" in plan.reason
    assert plan_memory(_Report(800, 300), device="cpu", setting="always", host_bytes=1000 * MB).mode == "streaming"
    with pytest.raises(MemoryPlanError) as err:  # it would fit streamed, but this source cannot stream
        plan_memory(_Report(1200, 300), device="cpu", can_stream="a GGUF file", host_bytes=1000 * MB)
    assert err.value.field == "COMPRESSOR_HOST_MEMORY_BYTES" and "a GGUF file" in err.value.message


def test_calibration_activations_too_large_for_the_device_name_calibration_samples():
    with pytest.raises(MemoryPlanError) as err:  # a recipe that cannot keep them in host memory
        plan_memory(_Report(100, 100, device_mb=3000, activation_mb=1800), device="cuda:0", offload_ok=False,
                    host_bytes=10_000 * MB, device_bytes=1000 * MB, samples=512, seqlen=2048)
    assert err.value.field == "calibration.samples" and "512 samples x 2048 tokens" in err.value.message
    fits = int(err.value.message.split("use at most ")[1].split()[0])
    assert 0 < fits < 512
    with pytest.raises(MemoryPlanError) as err:  # the layer itself does not fit: not the samples' fault
        plan_memory(_Report(100, 100, device_mb=3000, activation_mb=10), device="cuda:0",
                    host_bytes=10_000 * MB, device_bytes=1000 * MB, samples=4, seqlen=16)
    assert err.value.field == "COMPRESSOR_DEVICE_MEMORY_BYTES"


def test_a_bad_budget_setting_is_named(monkeypatch):
    monkeypatch.setenv("COMPRESSOR_HOST_MEMORY_BYTES", "lots")
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(_Report(100, 100), device="cpu")
    assert err.value.field == "COMPRESSOR_HOST_MEMORY_BYTES"


def test_activations_too_large_for_the_device_are_kept_in_host_memory_when_the_host_holds_them():
    plan = plan_memory(_Report(100, 100, device_mb=3000, activation_mb=1800), device="cuda:0",
                       host_bytes=10_000 * MB, device_bytes=1000 * MB, samples=512, seqlen=2048)
    assert plan.offload_activations and plan.mode == "in-memory"
    with pytest.raises(MemoryPlanError) as err:  # nor does the host hold them
        plan_memory(_Report(100, 100, device_mb=3000, activation_mb=1800), device="cuda:0",
                    host_bytes=1500 * MB, device_bytes=1000 * MB, samples=512, seqlen=2048)
    assert err.value.field == "calibration.samples" and "host memory" in err.value.message


def test_offloaded_activations_give_the_same_compression(model):
    """On the CPU the per-batch move is a no-op, so this checks the offload path's data flow: the
    activations are captured on the host and every layer call goes through LayerInputs.forward."""
    import copy

    from compression.sequential import compress_model

    calibration = random_calibration(3, 16)
    twin = copy.deepcopy(model)
    plain = compress_model(model, Recipe.from_preset("W4A16"), calibration)
    offloaded = compress_model(twin, Recipe.from_preset("W4A16"), calibration, offload_activations=True)
    assert [r.summary() for r in plain.modules.values()] == [r.summary() for r in offloaded.modules.values()]
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_offloading_is_refused_for_recipes_that_replay_activations(model):
    from compression.errors import RecipeError
    from compression.sequential import compress_model

    with pytest.raises(RecipeError) as err:
        compress_model(model, Recipe.from_preset("FP8+KV_FP8"), random_calibration(2, 16), offload_activations=True)
    assert err.value.field == "calibration.samples"


# -- Hub models: shards downloaded one by one as the layers need them -------------------------------
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


class _Hub:
    """The Hub, for one repository, at its edge: ``hf_hub_download`` and ``parse_safetensors_file_metadata``
    serve the shards of a local sharded checkpoint (``remote``), laid out in a Hugging Face cache the
    way huggingface_hub does (blob + snapshot symlink); everything else (config, tokenizer, index)
    is already in the cache, as ``hub_snapshot(weights=False)`` leaves it."""

    def __init__(self, cache: Path, repo_id: str, remote: Path):
        self.repo_id, self.remote, self.downloads = repo_id, remote, []
        self.repo = cache / f"models--{repo_id.replace('/', '--')}"
        self.snapshot = self.repo / "snapshots" / COMMIT
        (self.repo / "blobs").mkdir(parents=True)
        self.snapshot.mkdir(parents=True)
        (self.repo / "refs").mkdir()
        (self.repo / "refs" / "main").write_text(COMMIT)
        for file in sorted(remote.iterdir()):
            if not file.name.endswith(".safetensors"):
                self._cache(file.name)

    def _cache(self, name: str) -> Path:
        blob = self.repo / "blobs" / f"blob-{name}"
        blob.write_bytes((self.remote / name).read_bytes())
        (self.snapshot / name).symlink_to(Path("../../blobs") / blob.name)
        return self.snapshot / name

    def hf_hub_download(self, repo_id, filename, *, revision=None, **kwargs):
        assert (repo_id, revision) == (self.repo_id, COMMIT), (repo_id, revision)
        self.downloads.append(filename)
        return str(self._cache(filename))

    def parse_safetensors_file_metadata(self, repo_id, filename, *, revision=None, **kwargs):
        from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo

        assert (repo_id, revision) == (self.repo_id, COMMIT)
        raw = (self.remote / filename).read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        meta = header.pop("__metadata__", {})
        return SafetensorsFileMetadata(metadata=meta, tensors={
            name: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
            for name, v in header.items()})


@pytest.fixture
def hub(tmp_path, monkeypatch) -> _Hub:
    import huggingface_hub
    import huggingface_hub.constants

    from tests.tiny import demo_tokenizer, tiny_llama

    remote = tmp_path / "remote"
    tiny_llama(layers=3).save_pretrained(remote, safe_serialization=True, max_shard_size="300KB")
    demo_tokenizer().save_pretrained(remote)
    served = _Hub(tmp_path / "hf-cache", "acme/tiny-sharded", remote)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # nothing else may reach out
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", served.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "parse_safetensors_file_metadata", served.parse_safetensors_file_metadata)
    return served


def _layer_order(weight_map: dict[str, str], layers: int) -> tuple[set[str], list[set[str]]]:
    """(the shards of the tensors outside the layers, the shards each layer adds, in layer order)."""
    outside = {shard for name, shard in weight_map.items() if ".layers." not in name}
    added: list[set[str]] = []
    for i in range(layers):
        before = outside.union(*added)
        added.append({shard for name, shard in weight_map.items() if f".layers.{i}." in name} - before)
    return outside, added


def _downloaded_by_layer(downloads: list[str], outside: set[str], added: list[set[str]]) -> bool:
    """Whether ``downloads`` is the outside shards, then layer 0's new shards, then layer 1's ... once each."""
    groups, start = [outside, *added], 0
    for group in groups:
        if set(downloads[start:start + len(group)]) != group:
            return False
        start += len(group)
    return start == len(downloads)


def test_hub_shards_are_downloaded_lazily_in_layer_order(hub, tmp_path):
    from compression.model_io.loading import load_model
    from compression.sequential import compress_model

    weight_map = json.loads((hub.remote / "model.safetensors.index.json").read_text())["weight_map"]
    outside, added = _layer_order(weight_map, 3)
    assert all(added)  # each layer adds shards of its own

    loaded = load_model(hub.repo_id, streamed=True)
    streamed = loaded.streamed
    assert loaded.identity["revision"] == COMMIT
    # embeddings, norm and head only; the shards' headers came without downloading them
    assert sorted(hub.downloads) == sorted(outside)
    seen: list[list[str]] = []
    real_load = streamed.load

    def load(index, layer, device="cpu"):
        real_load(index, layer, device)
        seen.append(list(hub.downloads))

    streamed.load = load
    streamed.begin_export(tmp_path / "out", torch.float32)
    report = compress_model(streamed.model, Recipe.from_preset("FP8_DYNAMIC"), [], layer_io=streamed)
    streamed.finish_export(loaded.tokenizer, Recipe.from_preset("FP8_DYNAMIC"), report)
    assert len(seen) == 3
    for i, downloaded in enumerate(seen):  # once layer i is read: its shards and earlier ones, never later ones
        assert _downloaded_by_layer(downloaded, outside, added[:i + 1]), (i, downloaded)
    assert streamed.reader.fetched == hub.downloads == seen[-1]  # each shard once


def test_a_streamed_hub_job_matches_the_same_job_on_the_local_checkpoint(hub, tmp_path):
    spec = {**_spec(hub.remote, "FP8_DYNAMIC", "always"), "model": hub.repo_id, "allowed_roots": []}
    hub_results = run_job(spec, tmp_path / "from-hub")
    assert hub_results["memory"]["mode"] == "streaming"
    weight_map = json.loads((hub.remote / "model.safetensors.index.json").read_text())["weight_map"]
    assert _downloaded_by_layer(hub.downloads, *_layer_order(weight_map, 3)), hub.downloads
    run_job(_spec(hub.remote, "FP8_DYNAMIC", "always"), tmp_path / "local")
    from_hub, local = _tensors(tmp_path / "from-hub"), _tensors(tmp_path / "local")
    assert from_hub.keys() == local.keys() and all(torch.equal(from_hub[k], local[k]) for k in local)


def test_a_hub_job_refused_by_its_memory_plan_downloads_no_shard(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_HOST_MEMORY_BYTES", str(50 * 2 ** 20))
    spec = {**_spec(hub.remote, "FP8_DYNAMIC", "auto"), "model": hub.repo_id, "allowed_roots": []}
    with pytest.raises(MemoryPlanError) as err:
        run_job(spec, tmp_path / "out")
    assert err.value.field == "COMPRESSOR_HOST_MEMORY_BYTES"
    assert hub.downloads == [] and not list(hub.snapshot.glob("*.safetensors"))
    _no_output(tmp_path, "out")


def test_the_pre_flight_layout_says_which_families_store_their_experts_fused():
    """What the submission's memory plan tells a Hub model by (its shards are not downloaded yet)."""
    from transformers import AutoConfig

    from compression.preflight import model_layout
    from tests.engine.test_more_families import _COMMON, CONFIGS
    from tests.tiny import tiny_family_config

    for family in ("llama", "mixtral", "qwen3_moe", "deepseek_v3"):
        assert not model_layout(tiny_family_config(family)).experts_stored_fused, family
    for family in ("gpt_oss", "llama4_text"):
        layout = model_layout(AutoConfig.for_model(family, **{**_COMMON, **CONFIGS[family]}))
        assert layout.experts and layout.experts_stored_fused, family
