# SPDX-License-Identifier: Apache-2.0
"""KVzip on transformers models: the reference path (scoring, compressed cache, demo)."""

from kvzip_plugin.hf.attention import install
from kvzip_plugin.hf.cache import KVzipCache, KVzipLayer, compact, kv_bytes
from kvzip_plugin.hf.compressor import CompressedContext, CompressionStats, KVzipCompressor
from kvzip_plugin.hf.generate import Answer, greedy_answer
from kvzip_plugin.hf.template import ContextLayout, build_layout, question_ids

__all__ = [
    "Answer", "CompressedContext", "CompressionStats", "ContextLayout", "KVzipCache", "KVzipCompressor",
    "KVzipLayer", "build_layout", "compact", "greedy_answer", "install", "kv_bytes", "question_ids",
]
