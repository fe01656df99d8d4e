# SPDX-License-Identifier: Apache-2.0
"""KVzip scoring: repeat-input construction and the per-layer score kernel (engine-agnostic)."""

from kvzip_plugin.scoring.kvzip import chunk_scores
from kvzip_plugin.scoring.reconstruction import RepeatChunk, chunk_spans, repeat_chunks

__all__ = ["RepeatChunk", "chunk_scores", "chunk_spans", "repeat_chunks"]
