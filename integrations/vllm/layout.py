# SPDX-License-Identifier: Apache-2.0
"""Token-major views of vLLM's per-layer paged KV buffers.

Compaction and scoring address a slot as (block, offset in block, KV head). Each attention backend
stores a layer's KV differently; this module turns the buffer a worker gets in
`register_kv_caches` into two strided views `[num_blocks, block_size, H_kv, D]` (keys, values)
over the same storage, so reads and writes through them are reads and writes of the engine's cache.

Layouts (vLLM 0.32 CPU, 0.33 CUDA):

* CPU backend, ISA `vec` (float32, block size a multiple of 32): `[num_blocks, H_kv, block_size,
  2 * D]`; per (block, head) the first `block_size * D` numbers are the keys stored transposed
  (`[D, block_size]`), the next `block_size * D` the values token-major (`[block_size, D]`).
  Verified end to end: outputs on a compacted prefix equal a transformers run of the same kept pairs
  (tests/integrations/vllm/test_e2e_kvzip.py).
  Other CPU ISAs (`amx`, `vec16`, `neon`, ...) pack keys differently: unsupported (fail closed).
* CUDA backends of vLLM 0.33 (`kv4d`): per-layer 4-D views `[num_blocks, H_kv, block_size, 2 * D]` over
  one buffer, physically LBNHC (`[num_blocks, block_size, H_kv, 2D]`, the default with FlashAttention)
  or LBHNC (contiguous as shaped), per the layout vLLM resolved; FlashAttention splits them as
  `kv_cache.transpose(1, 2).split(head_size, -1)` (keys first). The views below are that split, so
  they address either physical order through the strides (`../shared/docs/cuda-review.md` §1).
* Older CUDA layout (vLLM 0.32, NHD): `[2, num_blocks, block_size, H_kv, D]`.

The worker uses the scheduler's block ids, so a buffer's block must be the manager's block: vLLM may
split a manager block into several kernel blocks (`check_block_size` fails closed then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_ISAS = ("vec",)
FLOAT_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""KV dtypes the plugin can read as numbers. A quantized cache (`--kv-cache-dtype fp8*`: vLLM 0.33 views it
as uint8, `STR_DTYPE_TO_TORCH_DTYPE`) holds codes that need the layer's scales: its scores and the head-page
attention would be computed on raw bytes, so it fails closed."""


class UnsupportedKVLayout(RuntimeError):
    """The layer's KV layout is not one this module knows how to address."""


@dataclass(frozen=True)
class LayoutSpec:
    """How one layer's KV buffer is laid out: `kind` is `cpu_vec`, `kv4d` or `nhd`."""

    kind: str
    block_size: int
    num_kv_heads: int
    head_size: int


def detect(kv_cache: torch.Tensor, *, backend: str, isa: str | None, block_size: int,
           num_kv_heads: int, head_size: int) -> LayoutSpec:
    """Pick the layout of one layer from its buffer shape and backend, or raise `UnsupportedKVLayout`."""
    if backend == "CPU_ATTN":
        if isa not in CPU_ISAS or kv_cache.dtype != torch.float32:
            raise UnsupportedKVLayout(f"CPU attention ISA {isa!r} with {kv_cache.dtype} (supported: "
                                      f"{', '.join(CPU_ISAS)} with float32)")
        want = (num_kv_heads, block_size, 2 * head_size)
        if kv_cache.dim() != 4 or tuple(kv_cache.shape[1:]) != want or not kv_cache.is_contiguous():
            raise UnsupportedKVLayout(f"CPU KV buffer {tuple(kv_cache.shape)}, expected [blocks, *{want}]")
        return LayoutSpec("cpu_vec", block_size, num_kv_heads, head_size)
    if kv_cache.dtype not in FLOAT_KV_DTYPES:
        raise UnsupportedKVLayout(f"quantized KV cache ({kv_cache.dtype}; --kv-cache-dtype fp8*): the plugin "
                                  "reads keys and values as numbers, without their scales")
    if kv_cache.dim() == 4 and tuple(kv_cache.shape[1:]) == (num_kv_heads, block_size, 2 * head_size) and \
            kv_cache.stride(-1) == 1:
        return LayoutSpec("kv4d", block_size, num_kv_heads, head_size)
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and tuple(kv_cache.shape[2:]) == (
            block_size, num_kv_heads, head_size):
        return LayoutSpec("nhd", block_size, num_kv_heads, head_size)
    raise UnsupportedKVLayout(f"backend {backend} buffer {tuple(kv_cache.shape)}")


def token_major(kv_cache: torch.Tensor, spec: LayoutSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views `[num_blocks, block_size, H_kv, D]` over `kv_cache`'s storage."""
    bs, h, d = spec.block_size, spec.num_kv_heads, spec.head_size
    if spec.kind == "cpu_vec":
        raw = kv_cache.view(kv_cache.shape[0], h, 2, bs * d)
        keys = raw[:, :, 0].unflatten(-1, (d, bs)).permute(0, 3, 1, 2)
        values = raw[:, :, 1].unflatten(-1, (bs, d)).permute(0, 2, 1, 3)
        return keys, values
    if spec.kind == "kv4d":
        return kv_cache[..., :d].transpose(1, 2), kv_cache[..., d:].transpose(1, 2)
    if spec.kind == "nhd":
        return kv_cache[0], kv_cache[1]
    raise UnsupportedKVLayout(spec.kind)


def check_block_size(spec: LayoutSpec, manager_block_size: int) -> None:
    """Raise `UnsupportedKVLayout` unless a buffer block is a scheduler (manager) block: the worker
    addresses the buffer with the scheduler's block ids."""
    if spec.block_size != manager_block_size:
        raise UnsupportedKVLayout(f"the KV buffer's blocks hold {spec.block_size} tokens but the scheduler's "
                                  f"hold {manager_block_size} (vLLM splits blocks for this attention backend)")


def read_tokens(view: torch.Tensor, block_ids: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The first `n_tokens` tokens of a request whose block-table row starts with `block_ids`,
    as `[H_kv, n_tokens, D]` (a copy)."""
    bs = view.shape[1]
    n_blocks = -(-n_tokens // bs)
    rows = view[block_ids[:n_blocks].long()]  # [n_blocks, bs, H, D]
    return rows.reshape(n_blocks * bs, view.shape[2], view.shape[3])[:n_tokens].transpose(0, 1)


def page_reader(kv_cache: torch.Tensor, spec: LayoutSpec):
    """(blocks `[P]`, head slots `[P]`) -> keys and values `[P, block_size, D]` of those head pages of
    `kv_cache`, read with one row gather where the layout keeps a head page contiguous (CPU `vec`: keys
    and values of a (block, head) are one row; keys come back as a transposed view), else by indexing
    `token_major`'s views."""
    bs, h, d = spec.block_size, spec.num_kv_heads, spec.head_size
    if spec.kind == "cpu_vec":
        raw = kv_cache.view(kv_cache.shape[0] * h, 2, bs * d)

        def read(blocks: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            rows = raw.index_select(0, blocks * h + slots)  # [P, 2, bs * D]
            return rows[:, 0].unflatten(-1, (d, bs)).transpose(1, 2), rows[:, 1].unflatten(-1, (bs, d))
        return read
    keys, values = token_major(kv_cache, spec)
    return lambda blocks, slots: (keys[blocks, :, slots], values[blocks, :, slots])
