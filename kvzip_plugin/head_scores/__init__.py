# SPDX-License-Identifier: Apache-2.0
"""Context-independent head-level KVzip scores: one `(layers, KV heads)` file per model.

A head's score is the max over positions of the KVzip scores of one calibration run; several
calibration runs combine by element-wise max. Files shipped with the package live in this folder
and are found by the model's architecture fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvzip_plugin.types import ScoreMap

FORMAT = "kvzip-head-scores/1"
SHIPPED_DIR = Path(__file__).parent


def fingerprint(model_config: Any) -> dict[str, Any]:
    """The architecture fields a head-score file must match."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return {
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
    }


def head_scores_from(score_maps: list[ScoreMap]) -> torch.Tensor:
    """`[layers, KV heads]`: max over positions, then element-wise max over calibration runs."""
    if not score_maps:
        raise ValueError("at least one calibration score map is needed")
    return torch.stack([s.scores.amax(dim=-1) for s in score_maps]).amax(dim=0)


def save_head_scores(path: Path, scores: torch.Tensor, model_config: Any, name: str,
                     calibration: str) -> None:
    """Write a head-score file (JSON: readable, diffable, a few KB)."""
    doc = {
        "format": FORMAT,
        "model": name,
        "fingerprint": fingerprint(model_config),
        "calibration": calibration,
        "scores": [[float(x) for x in row] for row in scores.tolist()],
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")


def load_head_scores(model_config: Any, path: Path | None = None) -> torch.Tensor:
    """Head scores `[layers, KV heads]` for `model_config`, from `path` or the shipped files.

    Raises:
        FileNotFoundError: no shipped file matches the model and no path was given.
        ValueError: the file does not match the model's architecture.
    """
    want = fingerprint(model_config)
    if path is None:
        for candidate in sorted(SHIPPED_DIR.glob("*.json")):
            if json.loads(candidate.read_text()).get("fingerprint") == want:
                path = candidate
                break
        else:
            raise FileNotFoundError(
                f"no shipped head-score file matches {want}; compute one with "
                "`kvzip calibrate-heads` and pass head_scores_path"
            )
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    if doc["fingerprint"] != want:
        raise ValueError(f"{path}: made for {doc['fingerprint']}, the model is {want}")
    scores = torch.tensor(doc["scores"], dtype=torch.float32)
    shape = (want["num_hidden_layers"], want["num_key_value_heads"])
    if tuple(scores.shape) != shape:
        raise ValueError(f"{path}: scores have shape {tuple(scores.shape)}, expected {shape}")
    return scores


def head_level_scores(head_scores: torch.Tensor, n_context: int) -> torch.Tensor:
    """Pair scores `[layers, KV heads, n_context]` under which KVzip's `pair` selection (one global
    threshold) keeps the context-independent head-level plan: whole (layer, KV head) context spans in
    the order of their head scores, then the most recent tokens of the boundary head. The engines serve
    the `kvzip_head` scorer this way, through the same store as `kvzip`, with no scoring pass.

    Scores are ranks, not the head scores themselves, so that every token of a higher head outranks every
    token of a lower one however close their head scores are (ties: lower index first).
    """
    n_layers, n_heads = head_scores.shape
    order = torch.argsort(head_scores.flatten().float(), stable=True)  # ascending: rank 0 = least useful
    rank = torch.empty(n_layers * n_heads, dtype=torch.float64)
    rank[order] = torch.arange(n_layers * n_heads, dtype=torch.float64)
    # later tokens first; under half a rank, so float32 rounding never mixes two heads' tokens
    within = 0.5 * torch.arange(n_context, dtype=torch.float64) / max(n_context, 1)
    return ((rank.view(n_layers, n_heads, 1) + within.view(1, 1, -1)) / (n_layers * n_heads)).float()
