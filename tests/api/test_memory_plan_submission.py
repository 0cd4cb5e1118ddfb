"""POST /api/jobs applies the worker's memory plan before queueing: a job the worker would refuse
(a model too large for the configured host budget, calibration activations too large for the device
or the host) is refused with a 400 naming the field to change, and no job row is created. A budget
the deployment leaves unset is the worker's to measure: nothing is refused for it here."""
import json
import struct

import pytest
import torch

from jobs.models import Job

from .conftest import errors

pytestmark = pytest.mark.django_db

URL = "/api/jobs"
EVALUATION = {"tasks": [], "windows": 2}
GB = 2 ** 30


def _llama_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, torch_dtype="bfloat16")


def _sparse_checkpoint(path, config) -> str:
    """config.json + a model.safetensors whose header holds every tensor of the model (bf16) and whose
    data is a hole in a sparse file: the headers are real, the 13 GB take no disk."""
    from transformers import AutoModelForCausalLM

    config.save_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    header, offset = {}, 0
    for name, tensor in model.state_dict().items():
        size = tensor.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + offset)
    return str(path)


def _placeholder_checkpoint(path, config) -> str:
    """config.json + a safetensors file that is not the model's (pre-flight reads the config only;
    the worker could not stream it)."""
    from safetensors.torch import save_file

    config.save_pretrained(path)
    save_file({"placeholder": torch.zeros(1)}, str(path / "model.safetensors"))
    return str(path)


@pytest.fixture
def plan_env(monkeypatch, settings, tmp_path):
    """The memory-plan settings, all unset; the tests set them as a deployment would (Django settings)."""
    settings.COMPRESSOR_MODEL_ROOTS = [str(tmp_path)]
    settings.COMPRESSOR_DEVICE = "cpu"
    for name in ("COMPRESSOR_HOST_MEMORY_BYTES", "COMPRESSOR_DEVICE_MEMORY_BYTES", "COMPRESSOR_STREAMING"):
        monkeypatch.delenv(name, raising=False)
        setattr(settings, name, "")
    return settings


def _post(api, model, preset="FP8_DYNAMIC", **calibration):
    return api.post(URL, {"model": model, "recipe": {"preset": preset}, "evaluation": EVALUATION,
                          **({"calibration": calibration} if calibration else {})}, format="json")


def test_a_model_that_fits_no_way_is_refused_at_submission_naming_the_setting(api, sent, plan_env, tmp_path):
    model = _placeholder_checkpoint(tmp_path / "llama-7b", _llama_7b_config())
    plan_env.COMPRESSOR_HOST_MEMORY_BYTES = str(16 * GB)
    response = _post(api, model)
    assert response.status_code == 400, response.content
    message = errors(response)["model"]
    assert "COMPRESSOR_HOST_MEMORY_BYTES" in message and "cannot be streamed" in message
    assert not Job.objects.exists() and sent == []

    plan_env.COMPRESSOR_HOST_MEMORY_BYTES = ""  # unset: the worker measures its own memory
    accepted = _post(api, model)
    assert accepted.status_code == 201, accepted.content
    assert Job.objects.count() == 1 and len(sent) == 1


def test_a_streamable_model_is_accepted_when_it_fits_streamed_and_refused_when_it_does_not(api, sent, plan_env,
                                                                                         tmp_path):
    model = _sparse_checkpoint(tmp_path / "llama-7b", _llama_7b_config())
    plan_env.COMPRESSOR_HOST_MEMORY_BYTES = str(16 * GB)  # ~47 GB in memory, a few GB streamed
    accepted = _post(api, model)
    assert accepted.status_code == 201, accepted.content
    plan_env.COMPRESSOR_HOST_MEMORY_BYTES = str(2 * GB)
    refused = _post(api, model)
    assert refused.status_code == 400
    message = errors(refused)["model"]
    assert "streamed layer by layer it still needs" in message and "COMPRESSOR_HOST_MEMORY_BYTES" in message
    assert Job.objects.count() == 1 and len(sent) == 1


def test_streaming_forced_on_a_model_that_cannot_stream_is_refused(api, sent, plan_env, tmp_path):
    model = _placeholder_checkpoint(tmp_path / "llama-7b", _llama_7b_config())
    plan_env.COMPRESSOR_STREAMING = "always"
    response = _post(api, model)
    assert response.status_code == 400
    assert "COMPRESSOR_STREAMING=always but" in errors(response)["model"]
    assert not Job.objects.exists() and sent == []


def test_calibration_too_large_for_the_host_names_calibration_samples(api, sent, plan_env):
    plan_env.COMPRESSOR_HOST_MEMORY_BYTES = str(8 * GB)
    response = _post(api, "demo", "W8A8", samples=4096, seqlen=8192)
    assert response.status_code == 400
    message = errors(response)["calibration.samples"]
    assert "4096 samples x 8192 tokens" in message and "host memory" in message
    fits = int(message.split("use at most ")[1].split()[0])
    assert 0 < fits < 4096
    assert _post(api, "demo", "W8A8", samples=fits, seqlen=8192).status_code == 201
    assert Job.objects.count() == 1 and len(sent) == 1


def test_calibration_too_large_for_the_device_names_calibration_samples(api, sent, plan_env):
    plan_env.COMPRESSOR_DEVICE = "cuda"  # the worker's device; the web only plans for it
    plan_env.COMPRESSOR_DEVICE_MEMORY_BYTES = str(4 * GB)
    # FP8+KV_FP8 replays activations for its KV-cache scales, so they cannot be kept in host memory
    response = _post(api, "demo", "FP8+KV_FP8", samples=4096, seqlen=8192)
    assert response.status_code == 400
    message = errors(response)["calibration.samples"]
    assert "the cuda device" in message and "use at most" in message
    assert not Job.objects.exists() and sent == []


def test_a_malformed_budget_setting_is_the_servers_fault(api, sent, plan_env):
    plan_env.COMPRESSOR_HOST_MEMORY_BYTES = "lots"
    response = _post(api, "demo")
    assert response.status_code == 400
    assert "COMPRESSOR_HOST_MEMORY_BYTES" in errors(response)[None]
    assert not Job.objects.exists()


def test_the_worker_is_given_the_same_memory_settings(api, sent, plan_env):
    from compression.model_io.streaming import configured_budgets, streaming_setting
    from jobs.tasks import job_spec

    plan_env.COMPRESSOR_HOST_MEMORY_BYTES = str(64 * GB)
    plan_env.COMPRESSOR_STREAMING = "never"
    response = _post(api, "demo")
    assert response.status_code == 201, response.content
    spec = job_spec(Job.objects.get())
    assert configured_budgets(spec) == (64 * GB, None) and streaming_setting(spec) == "never"


def test_an_moe_model_too_large_for_memory_is_accepted_to_stream(api, sent, plan_env, tmp_path):
    """Mixtral-8x7B's shape (47B parameters, ~190 GB in float32): transformers fuses its experts in memory; the
    worker splits them and reads them expert by expert (or cuts them from fused tensors, as this checkpoint,
    written from the fused state dict, stores them), so at a 32 GB host budget it is queued to stream."""
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                           torch_dtype="bfloat16")
    model = _sparse_checkpoint(tmp_path / "mixtral", config)
    plan_env.COMPRESSOR_HOST_MEMORY_BYTES = str(32 * GB)
    accepted = _post(api, model)
    assert accepted.status_code == 201, accepted.content
    assert Job.objects.count() == 1 and len(sent) == 1
    plan_env.COMPRESSOR_HOST_MEMORY_BYTES = str(4 * GB)  # one layer's experts alone are ~5.6 GB in float32
    refused = _post(api, model)
    assert refused.status_code == 400 and "streamed layer by layer it still needs" in errors(refused)["model"]
