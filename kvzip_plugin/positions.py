# SPDX-License-Identifier: Apache-2.0
"""Logical vs physical lengths of a request that reads a compacted prefix.

A compacted prefix stands for L logical tokens but occupies P physical slots (both multiples of the
block size). A request on it keeps logical positions for RoPE and token ids (the prefix's tokens are
positions 0..L-1, its own tokens L, L+1, ...), while its KV slots and the attention `seq_lens` are
physical: a constant offset `L - P` per request.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompactedLength:
    """L and P of one compacted prefix."""

    logical_length: int
    physical_length: int
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.logical_length % self.block_size or self.physical_length % self.block_size:
            raise ValueError(f"L={self.logical_length} and P={self.physical_length} must be multiples of "
                             f"the block size {self.block_size}")
        if not 0 < self.physical_length <= self.logical_length:
            raise ValueError(f"need 0 < P <= L, got P={self.physical_length}, L={self.logical_length}")

    @property
    def offset(self) -> int:
        """L - P: logical minus physical position of every token after the prefix."""
        return self.logical_length - self.physical_length

    @property
    def block_offset(self) -> int:
        return self.offset // self.block_size

    def physical_position(self, logical_position: int) -> int:
        """Slot position of a token after the prefix (`logical_position >= L`)."""
        if logical_position < self.logical_length:
            raise ValueError(f"position {logical_position} is inside the compacted prefix (L={self.logical_length})")
        return logical_position - self.offset

    def physical_seq_len(self, num_computed_tokens: int, num_new_tokens: int) -> int:
        """Attention `seq_len` (keys visible) after a step over `num_new_tokens` on top of
        `num_computed_tokens` logical tokens (>= L)."""
        if num_computed_tokens < self.logical_length:
            raise ValueError("a request on a compacted prefix has computed at least the prefix")
        return num_computed_tokens - self.offset + num_new_tokens

    def physical_blocks(self, num_logical_tokens: int) -> int:
        """Blocks a request with `num_logical_tokens` (>= L) tokens occupies."""
        return -(-(num_logical_tokens - self.offset) // self.block_size)
