# SPDX-License-Identifier: Apache-2.0
"""Greedy decoding over a prefilled cache, timing each decode step."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache

from kvzip_plugin.hf.template import ContextLayout, question_ids


@dataclass(frozen=True)
class Answer:
    """A generated answer.

    Attributes:
        text: decoded answer (special tokens skipped).
        token_ids: generated ids (the stop token included if one was produced).
        decode_ms_per_token: mean wall time of the decode steps (after the question prefill).
    """

    text: str
    token_ids: tuple[int, ...]
    decode_ms_per_token: float


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return ids


@torch.inference_mode()
def greedy_answer(model: Any, tokenizer: Any, cache: Cache, layout: ContextLayout, question: str,
                  max_new_tokens: int = 32) -> Answer:
    """Append the question to `cache` (which it mutates: pass a fresh view) and decode greedily."""
    ids = torch.tensor([question_ids(tokenizer, layout, question)], device=model.device)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    stop = _stop_ids(model, tokenizer)
    out: list[int] = []
    step_seconds = 0.0
    steps = 0
    token = int(logits[0, -1].argmax())
    while True:
        out.append(token)
        if token in stop or len(out) >= max_new_tokens:
            break
        t0 = time.perf_counter()
        logits = model(input_ids=torch.tensor([[token]], device=model.device), past_key_values=cache,
                       use_cache=True).logits
        token = int(logits[0, -1].argmax())
        step_seconds += time.perf_counter() - t0
        steps += 1
    text = tokenizer.decode(out, skip_special_tokens=True).strip()
    return Answer(text=text, token_ids=tuple(out), decode_ms_per_token=1000 * step_seconds / max(steps, 1))
