# SPDX-License-Identifier: Apache-2.0
"""A layer's runs for the Triton kernel (`kernels.run_attention.paged_run_attention`): the head pages read
where they lie in the engine's buffers, with no gather and no copy, one kernel launch per layer and step
for all the requests on the prefix.

The kernel addresses every head page by the element offset of its (token 0, dim 0) from one base
tensor. A layer's runs may lie in pages of several buffers, which may be separate allocations (SGLang
keeps one keys and one values tensor per layer; vLLM CUDA one buffer for all layers): the offsets are
distances in elements within the device's one flat address space, so one launch reaches them all.
Every buffer must share the dtype and the page strides (the engines' buffers are alike), and each
allocation must lie a whole number of elements from the base; otherwise `kernel_runs` returns None and
the caller keeps the torch path.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from kvzip_plugin import envs
from kvzip_plugin.store import HeadPageLayout, run_gather_index


@dataclass(frozen=True)
class KernelRuns:
    """One layer's runs as the kernel reads them.

    Attributes:
        base: a one-element view at the first buffer's first key element (the kernel's base pointer).
        k_offsets, v_offsets: `[H_kv, max_pages]` int64 element offsets from `base` of each page of each
            head's run, in run order (-1 past the run).
        lengths: `[H_kv]` int64 tokens of each run.
        page_size: tokens per page.
        k_strides, v_strides: `(token, dim)` element strides inside a key / value page.
    """

    base: torch.Tensor
    k_offsets: torch.Tensor
    v_offsets: torch.Tensor
    lengths: torch.Tensor
    page_size: int
    k_strides: tuple[int, int]
    v_strides: tuple[int, int]

    def attention(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`[n, H_q, D]` queries over the runs: out `[n, H_q, D]`, lse `[n, H_q]` (float32)."""
        from kvzip_plugin.kernels.run_attention import paged_run_attention

        return paged_run_attention(q, self.base, self.k_offsets, self.v_offsets, self.lengths, self.page_size,
                                   self.k_strides, self.v_strides, scale)


def use_kernel(device: torch.device) -> bool:
    """Whether head-page stores on `device` attend with the kernel (`envs.prefix_attention_backend`)."""
    backend = envs.prefix_attention_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ImportError("KVZIP_PREFIX_ATTENTION=triton needs Triton (pip install triton)")
        return True
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def kernel_runs(layout: HeadPageLayout, layer: int, block_ids: torch.Tensor,
                views) -> KernelRuns | None:
    """`layer`'s runs of a store whose blocks are `block_ids`, addressed in the buffers `views` gives
    (layer buffer -> token-major keys and values `[num_blocks, page_size, H_kv, D]`, any strides).
    None where the kernel cannot read them (head dim not a power of two >= 16, buffers unlike)."""
    grid, blocks, buffers, slots = run_gather_index(layout, layer)
    h_kv, max_pages = layout.pages.shape[1], max(layout.pages.shape[-1], 1)
    first_k, _ = views(int(buffers[0]) if buffers.numel() else 0)
    d = first_k.shape[-1]
    if d < 16 or d & (d - 1):
        return None
    item = first_k.element_size()
    base = first_k.as_strided((1,), (1,))  # the kernel's base pointer, no copy
    k_strides = (first_k.stride(1), first_k.stride(3))
    v_strides: tuple[int, int] | None = None
    k_off = torch.full((h_kv * max_pages,), -1, dtype=torch.long)
    v_off = torch.full((h_kv * max_pages,), -1, dtype=torch.long)
    ids = block_ids[blocks] if blocks.numel() else blocks
    for b in buffers.unique().tolist():
        k_view, v_view = views(int(b))
        if (k_view.dtype, v_view.dtype) != (first_k.dtype, first_k.dtype) or k_view.device != first_k.device:
            return None
        if (k_view.stride(1), k_view.stride(3)) != k_strides:
            return None
        if v_strides is None:
            v_strides = (v_view.stride(1), v_view.stride(3))
        elif (v_view.stride(1), v_view.stride(3)) != v_strides:
            return None
        sel = buffers == b
        for view, out in ((k_view, k_off), (v_view, v_off)):
            gap = view.data_ptr() - base.data_ptr()
            if gap % item:
                return None
            out[grid[sel]] = gap // item + ids[sel] * view.stride(0) + slots[sel] * view.stride(2)
    dev = first_k.device
    return KernelRuns(base, k_off.view(h_kv, max_pages).to(dev), v_off.view(h_kv, max_pages).to(dev),
                      layout.lengths[layer].long().to(dev), layout.page_size, k_strides,
                      v_strides if v_strides is not None else k_strides)


def backend_name(runs: object) -> str:
    """What read a layer's runs, for the engines' log: the Triton kernel or torch."""
    return "the Triton kernel" if isinstance(runs, KernelRuns) else "torch"
