# SPDX-License-Identifier: Apache-2.0
"""User configuration of KVzip compression, parsed once and validated field by field.

The same model serves the transformers reference path (`kvzip_plugin.hf`) and, later, the engine
integrations (their CLI flags map onto these fields). Every invalid value raises one
`pydantic.ValidationError` (a `ValueError`) whose message names the offending field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Structure = Literal["pair", "head", "layer", "layer_budget"]
ScorerName = Literal["kvzip", "kvzip_head"]
ScoreSoftmax = Literal["chunk", "full_cache"]

DEFAULT_REPEAT_PROMPT_FIRST = "\n\nRepeat the previous context exactly."
DEFAULT_REPEAT_PROMPT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with "


class KVzipConfig(BaseModel):
    """What to keep of a context's KV cache and how to score it.

    Layout of a compressed cache: `[protected prefix][kept context pairs][later tokens]`; only the
    context is ever evicted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    ratio: float = Field(0.3, gt=0.0, le=1.0, allow_inf_nan=False)
    """Fraction of the context's KV pairs kept, in (0, 1]. 0.3 keeps 30% (3.3x smaller)."""

    structure: Structure = "pair"
    """Eviction structure. `pair`: one global threshold over all layers, KV heads and positions
    (non-uniform budgets, the paper's default). `head`: the same count in every (layer, KV head),
    each head its own tokens (the layout a paged engine holds). `layer`: all KV heads of a layer
    keep the same tokens (layer score = max over its heads). `layer_budget`: each layer keeps the count
    the `pair` threshold gives it, split evenly over its KV heads, each head its own best tokens."""

    scorer: ScorerName = "kvzip"
    """`kvzip`: context-dependent reconstruction scores. `kvzip_head`: the context-independent
    head-level variant; whole (layer, KV head) context spans are kept or dropped using a
    `(layers, KV heads)` score file computed once per model."""

    head_scores_path: Path | None = None
    """JSON file of head-level scores for `scorer="kvzip_head"`; None = the file shipped for the
    model, if any."""

    score_softmax: ScoreSoftmax = "chunk"
    """`chunk` (official): the score softmax spans [protected prefix + this chunk's context keys +
    the repeat input's own causal keys]. `full_cache`: it spans the whole cache (for comparison)."""

    chunk_size: int = Field(2000, ge=1)
    """Context tokens reconstructed per scoring chunk."""

    carry_tokens: int = Field(8, ge=0)
    """Last tokens of the previous chunk quoted in the repeat prompt of chunks after the first."""

    repeat_prompt_first: str = DEFAULT_REPEAT_PROMPT_FIRST
    """Prompt (appended after the context, before the chat postfix) of the first chunk."""

    repeat_prompt_next: str = DEFAULT_REPEAT_PROMPT_NEXT
    """Prompt of later chunks; followed by the carried tokens."""

    system_prompt: str | None = None
    """System prompt rendered into the chat-template opening (part of the protected prefix)."""

    protected_prefix_tokens: int | None = Field(None, ge=0)
    """None: the protected prefix is the chat-template opening. N: the first N tokens of the
    compressed sequence are protected and the rest is the context (raw-sequence mode)."""

    min_context_tokens: int = Field(16, ge=1)
    """Contexts shorter than this are left uncompressed (achieved ratio 1.0)."""

    prefill_chunk_size: int = Field(16384, ge=1)
    """Tokens per forward when prefilling the context (bounds activation memory)."""

    score_query_block: int = Field(512, ge=1)
    """Repeat-input queries per score block: bounds the score buffer to
    `block x (prefix + chunk + repeat input)` per head, never context x context."""

    @field_validator("repeat_prompt_first", "repeat_prompt_next")
    @classmethod
    def _non_empty_prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the repeat prompt must contain text")
        return value

    @field_validator("head_scores_path")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _cross_fields(self) -> KVzipConfig:
        if self.scorer == "kvzip_head" and self.structure != "pair":
            raise ValueError(
                "structure: the head-level scorer 'kvzip_head' keeps or drops whole heads and "
                f"needs structure='pair', got structure={self.structure!r}"
            )
        return self
