# SPDX-License-Identifier: Apache-2.0
"""Test-harness shim 2 of 2: a stand-in for `sgl_kernel`, SGLang's kernel package, on a CPU.

With `SGLANG_USE_CPU_ENGINE=1` (needed for `--device cpu`, sglang `utils/common.py` `is_cpu()`), SGLang
0.5.23 imports CPU ops from `sgl_kernel` at module level. The official CPU build of sgl-kernel is not on
PyPI (source build for AMX Xeons), so the tests put this package on the server's PYTHONPATH instead.

* `assign_req_to_token_pool_cpu`: the one op a plain (non-speculative) CPU server calls
  (`sglang/srt/mem_cache/allocation.py` `assign_req_to_token_pool_func`, decode slot assignment),
  implemented in plain torch with the kernel's semantics.
* every other CPU op imported at start-up raises NotImplementedError when called: they serve
  speculative decoding and the triton-free KV copy (`copy_all_layer_kv_cache_cpu`, which works on raw
  pointers; `SGLANG_NATIVE_MOVE_KV_CACHE=1` selects SGLang's own torch path instead).

Nothing of SGLang's scheduler, caches, pools, attention or server is replaced: model layers fall back to
their `forward_native` torch code because `cpu_has_amx_support()` is False on such a machine.
"""

from __future__ import annotations

import torch

__version__ = "0.0.0+kvzip-test-shim"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """For each request i: `req_to_token[req_pool_indices[i], start[i]:end[i]]` = its slice of
    `out_cache_loc` (the slices are consecutive, in batch order)."""
    del pool_len  # row length; implied by req_to_token
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    pos = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[pos:pos + n].to(req_to_token.dtype)
        pos += n


def _unavailable(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available in the kvzip test shim")

    op.__name__ = name
    return op


_UNAVAILABLE = (
    "copy_all_layer_kv_cache_cpu",
    "rotate_input_ids_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "build_draft_decode_metadata_cpu",
)
for _name in _UNAVAILABLE:
    globals()[_name] = _unavailable(_name)
del _name
