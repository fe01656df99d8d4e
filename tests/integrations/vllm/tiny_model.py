# SPDX-License-Identifier: Apache-2.0
"""A tiny random-weight Llama saved as a local model folder (config, safetensors, tokenizer) for the
vLLM CPU engine. No downloads. Shapes vLLM's CPU attention accepts: head_dim 64 (16 fails there)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers import build_tokenizer


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    """hidden 256, 2 layers, 4 heads, 2 KV heads, head_dim 64, vocab 512; float32 weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init is near-uniform; widen it so greedy tokens vary
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "lm_head.weight")):
                param.mul_(4.0)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
