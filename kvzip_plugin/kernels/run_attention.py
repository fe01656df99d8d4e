# SPDX-License-Identifier: Apache-2.0
"""Attention of queries over every KV head's own run of kept pairs, read in place from head pages.

`prefix_attention.run_attention` takes the runs as one padded `[H_kv, T, D]` tensor, so the engines
gather them out of their KV buffers every step (`PagedStore.read_runs`). This kernel reads them
where they lie instead: a run is a list of head pages of `page_size` tokens, each page a strided
`[page_size, D]` block of keys (and one of values) inside some layer's KV buffer, all buffers
being views of one flat storage. Pages are given by their element offsets into that storage, so
pages of one run may sit in different layers' buffers (`store.place_runs` spills runs across them).

Same semantics as `run_attention`: query head `j` attends, with no mask, over the run of KV head
`j // G` (`G = H_q / H_kv`); online softmax in float32; a head whose run is empty gives lse -inf
and output 0.

Design: one program per (KV head, block of `BLOCK_M` query rows), the rows being the `G * n`
(query, group member) pairs of that KV head, so each KV head's run is read once per row block
(once in all for decoding, where `G * n` is small). The program loops over the run `BLOCK_N` tokens
at a time; each token finds its page (`t // page_size`) in the head's page table and its element
address from the page offset and the page's strides, so any `page_size` (1 for SGLang's token pool,
the block size for vLLM) and both token-major and transposed (`[D, page]`) key pages work.
"""

from __future__ import annotations

import torch

try:
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

_HALF = (torch.float16, torch.bfloat16)

if triton is not None:

    @triton.jit
    def _paged_run_attention_kernel(
        q_ptr, kv_ptr, k_pages_ptr, v_pages_ptr, lengths_ptr, out_ptr, lse_ptr,
        n_rows, group, page_size, qk_scale,
        stride_qn, stride_qh, stride_qd,
        stride_kp_h, stride_kp_p, stride_vp_h, stride_vp_p,
        k_tok_stride, k_dim_stride, v_tok_stride, v_dim_stride,
        stride_on, stride_oh, stride_ln, stride_lh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF_DOT: tl.constexpr,
    ):
        """Program (h, b): rows `b * BLOCK_M + [0, BLOCK_M)` of KV head `h`; row `r` is query `r // G`,
        query head `h * G + r % G`. `qk_scale` is the softmax scale times log2(e) (exp2 domain)."""
        h = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        qi = rows // group
        qh = h * group + rows % group
        d = tl.arange(0, HEAD_DIM)

        q_ptrs = q_ptr + qi.to(tl.int64)[:, None] * stride_qn + qh.to(tl.int64)[:, None] * stride_qh \
            + d[None, :].to(tl.int64) * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
        if not HALF_DOT:
            q = q.to(tl.float32)

        length = tl.load(lengths_ptr + h).to(tl.int32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        d64 = d.to(tl.int64)

        for start in range(0, length, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            t_ok = t < length
            page = t // page_size
            within = (t % page_size).to(tl.int64)
            k_off = tl.load(k_pages_ptr + h * stride_kp_h + page * stride_kp_p, mask=t_ok, other=0)
            v_off = tl.load(v_pages_ptr + h * stride_vp_h + page * stride_vp_p, mask=t_ok, other=0)
            k_base = k_off + within * k_tok_stride  # [BLOCK_N] element of (token, dim 0)
            v_base = v_off + within * v_tok_stride
            k = tl.load(kv_ptr + k_base[None, :] + d64[:, None] * k_dim_stride, mask=t_ok[None, :],
                        other=0.0)  # [D, BLOCK_N]
            v = tl.load(kv_ptr + v_base[:, None] + d64[None, :] * v_dim_stride, mask=t_ok[:, None],
                        other=0.0)  # [BLOCK_N, D]
            if HALF_DOT:
                s = tl.dot(q, k)  # half inputs, float32 accumulation (the products are exact)
            else:
                s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
            s = s * qk_scale
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: each block has a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            if HALF_DOT:
                acc = tl.dot(p.to(v.dtype), v, acc)
            else:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
            m_i = m_new

        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        o_ptrs = out_ptr + qi.to(tl.int64)[:, None] * stride_on + qh.to(tl.int64)[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out, mask=row_ok[:, None])
        tl.store(lse_ptr + qi.to(tl.int64) * stride_ln + qh.to(tl.int64) * stride_lh, lse, mask=row_ok)

    # Triton's CPU interpreter (TRITON_INTERPRET=1, chosen when `triton.jit` decorates) keeps bfloat16
    # as raw uint16 and its `tl.dot` multiplies those bits as integers (seen with Triton 3.9), so
    # there bfloat16 dots are done in float32 instead.
    _INTERPRETED = type(_paged_run_attention_kernel).__name__ == "InterpretedFunction"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def paged_run_attention(q: torch.Tensor, kv_storage: torch.Tensor, k_page_offsets: torch.Tensor,
                        v_page_offsets: torch.Tensor, lengths: torch.Tensor, page_size: int,
                        k_strides: tuple[int, int], v_strides: tuple[int, int], scale: float, *,
                        block_m: int | None = None, block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries over every KV head's own run, the runs read in place from head pages.

    Args:
        q: `[n, H_q, D]` queries (float32, bfloat16 or float16), any strides; `D` a power of two >= 16.
        kv_storage: 1-D tensor, the flat storage every page lives in (e.g. `buf.view(-1)` of the one
            allocation all layers' KV buffers are views of), on q's device.
        k_page_offsets, v_page_offsets: `[H_kv, max_pages]` int64 element offsets into `kv_storage`
            of element (token 0, dim 0) of each page of each head's run, in run order; entries past
            a run's `ceil(lengths[h] / page_size)` pages are never read (-1 padding).
        lengths: `[H_kv]` int tokens of each run (any length: the last page may be partly used).
            Must not exceed `max_pages * page_size` (not checked: the check would sync the GPU).
        page_size: tokens per page.
        k_strides: `(token_stride, dim_stride)` in elements of a key page: `(row_stride, 1)` for
            token-major pages, `(1, page_size)` for vLLM CPU's transposed `[D, block_size]` keys.
        v_strides: the same for a value page.
        scale: softmax scale.
        block_m, block_n: tile sizes (rows per program, tokens per loop step); powers of two >= 16.

    Returns:
        out `[n, H_q, D]` float32, lse `[n, H_q]` float32 (-inf, and out 0, for a head whose run is
        empty).

    With float32 storage the dot products are computed in IEEE float32 (no TF32). With bfloat16 /
    float16 storage and queries of the same dtype, QK^T runs in that dtype with float32 accumulation
    (exact products), and the probabilities are rounded to it for PV, as flash attention does; other
    dtype mixes are computed in float32 (so is bfloat16 under Triton's interpreter, whose bfloat16
    dot is broken).
    """
    if triton is None:
        raise ImportError("paged_run_attention needs Triton (pip install triton), which is not installed")
    if q.dim() != 3:
        raise ValueError(f"q must be [n, H_q, D], got shape {tuple(q.shape)}")
    n, h_q, d = q.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim D must be a power of two >= 16 for this kernel, got {d}")
    if kv_storage.dim() != 1:
        raise ValueError(f"kv_storage must be 1-D (the flat storage), got shape {tuple(kv_storage.shape)}")
    if k_page_offsets.dim() != 2 or k_page_offsets.shape != v_page_offsets.shape:
        raise ValueError(f"page offsets must both be [H_kv, max_pages], got {tuple(k_page_offsets.shape)} "
                         f"and {tuple(v_page_offsets.shape)}")
    h_kv = k_page_offsets.shape[0]
    if lengths.shape != (h_kv,):
        raise ValueError(f"lengths must be [H_kv] = [{h_kv}], got {tuple(lengths.shape)}")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"H_q ({h_q}) must be a positive multiple of H_kv ({h_kv})")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    dev = q.device
    for name, t in (("kv_storage", kv_storage), ("k_page_offsets", k_page_offsets),
                    ("v_page_offsets", v_page_offsets), ("lengths", lengths)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, q on {dev}")
    k_page_offsets = k_page_offsets.long()
    v_page_offsets = v_page_offsets.long()
    lengths = lengths.long().contiguous()
    group = h_q // h_kv
    n_rows = group * n
    out = torch.empty((n, h_q, d), dtype=torch.float32, device=dev)
    lse = torch.empty((n, h_q), dtype=torch.float32, device=dev)
    if n == 0:
        return out, lse
    bm = block_m or min(64, max(16, _next_pow2(n_rows)))
    bn = block_n or 64
    for name, b in (("block_m", bm), ("block_n", bn)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    half_dot = q.dtype == kv_storage.dtype and q.dtype in _HALF
    if _INTERPRETED and q.dtype == torch.bfloat16:
        half_dot = False
    grid = (h_kv, triton.cdiv(n_rows, bm))
    _paged_run_attention_kernel[grid](
        q, kv_storage, k_page_offsets, v_page_offsets, lengths, out, lse,
        n_rows, group, page_size, float(scale) * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        k_page_offsets.stride(0), k_page_offsets.stride(1), v_page_offsets.stride(0), v_page_offsets.stride(1),
        int(k_strides[0]), int(k_strides[1]), int(v_strides[0]), int(v_strides[1]),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, HALF_DOT=half_dot,
    )
    return out, lse
