# SPDX-License-Identifier: Apache-2.0
"""Test helpers: a small byte-level BPE tokenizer with a ChatML template, tiny models, and the benchmark
scripts loaded as modules."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TRAIN_TEXT = [
    "Repeat the previous context exactly. Repeat the part of the previous context exactly, starting with",
    "The quick brown fox jumps over the lazy dog. alpha beta gamma delta river stone cloud paper",
    "orange violet seven eleven code key value north south table window garden silver copper lamp",
    "What is the value of key? Answer: 0123456789 system user assistant",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A ~400-token byte-level BPE with `<|im_start|>`/`<|im_end|>` and a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TRAIN_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def make_model(arch: str, vocab_size: int = 512, seed: int = 0, layers: int = 3):
    """A tiny random-weight causal LM (float32, sdpa attention, eval mode)."""
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  max_position_embeddings=4096, head_dim=16, tie_word_embeddings=False)
    if arch == "llama-mha":
        config = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **common)
    elif arch == "llama-gqa":
        config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
    elif arch == "qwen2":
        config = Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)
    elif arch == "qwen3":
        config = Qwen3Config(num_attention_heads=4, num_key_value_heads=2, **common)
    elif arch == "mistral":
        config = MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **common)
    elif arch == "gemma3":
        config = Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=1, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                               "full_attention"][:layers],
                                  query_pre_attn_scalar=16, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    # random init gives near-uniform attention; sharpen it so eviction changes outputs measurably
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model.eval()


class ListHandler(logging.Handler):
    """A logging handler that keeps every message (formatted), for tests that check log lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_benchmark(name: str) -> ModuleType:
    """`benchmarks/<name>.py` (a script, not a package module) loaded as the module `name`, registered in
    `sys.modules` unless a module of that name is there already."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module
