# SPDX-License-Identifier: Apache-2.0
"""Adoption: requests served by a compacted prefix in SGLang.

A request whose tokens start with a live compacted prefix (L logical tokens held in P slots) matches it
instead of the tree (`adopt`): `prefix_len = P`, `last_node` = the entry's handle. Its `origin_input_ids`
become physical (`tokens[:P] + tokens[L:]`; the logical ones are kept in an `Adoption` on the request), so
every SGLang length (prefix_len, extend_end, seq_lens) is a row length. Positions get the offset `L - P`
back when a batch is built (`shift_positions`: RoPE sees logical positions) and outputs report logical
`prompt_tokens` / `cached_tokens` (`logical_view`). An adopted request is never inserted into the tree; a
request whose entry went away before admission gets its logical ids back (`unadopt`)."""

from __future__ import annotations

import time
from array import array
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from kvzip_plugin.integrations.sglang.attention import PagedRow
from kvzip_plugin.integrations.sglang.store import CompactedPrefix
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.radix_cache import RadixKey

ADOPT_ATTR = "_kvzip_adoption"


@dataclass
class Adoption:
    """Kept on a request served by a compacted prefix (`req._kvzip_adoption`)."""

    entry: CompactedPrefix
    logical_ids: array  # the request's own origin_input_ids
    skip_insert: bool  # its skip_radix_cache_insert before adoption
    counted: bool = False

    @property
    def offset(self) -> int:
        return self.entry.offset


def adoption_of(req: Any) -> Adoption | None:
    return getattr(req, ADOPT_ATTR, None)


def plain_tokens(req: Any) -> bool:
    """Token-only input (no images, embeddings or position overrides): the only kind compressed or adopted."""
    return req.multimodal_inputs is None and req.input_embeds is None and req.positional_embed_overrides is None


def _logical_tokens(req: Any, key: RadixKey) -> tuple[array, int]:
    """The request's logical token ids and the key's logical length."""
    info = adoption_of(req)
    if info is None:
        return key.token_ids, len(key)
    return info.logical_ids + req.output_ids, len(key) + info.offset


def adoptable(entries: list[CompactedPrefix], req: Any, key: RadixKey) -> CompactedPrefix | None:
    """The longest entry of the key's namespace that the request's logical tokens start with, if it may
    serve the request (no input logprobs inside the prefix, no sessions, beams or diffusion LMs)."""
    if not entries or key.is_bigram:
        return None
    if (not plain_tokens(req) or req.session is not None or getattr(req, "beam_group", None) is not None
            or req.is_dllm()):
        return None
    tokens, n = _logical_tokens(req, key)
    info = adoption_of(req)
    start = req.logprob_start_len
    if info is not None and start >= 0:
        start += info.offset
    best = None
    for entry in entries:
        L = entry.logical_length
        if L > n or (req.return_logprob and 0 <= start < L):  # input logprobs inside the prefix
            continue
        if best is not None and L <= best.logical_length:
            continue
        if tokens[:L] == entry.tokens:
            best = entry
    return best


def adopt(req: Any, entry: CompactedPrefix, empty_match: MatchResult) -> MatchResult:
    """Serve the request from `entry`: physical ids on the request, the entry's handle as its match."""
    info = adoption_of(req)
    if info is not None and info.entry is not entry:
        set_logical(req)
        info = None
    if info is None:
        logical = req.origin_input_ids
        info = Adoption(entry, logical, bool(req.skip_radix_cache_insert))
        L, P = entry.logical_length, entry.physical_length
        req.origin_input_ids = array("q", entry.tokens[:P]) + logical[L:]
        req.full_untruncated_fill_ids = req.origin_input_ids + req.output_ids
        if req.logprob_start_len >= 0:
            req.logprob_start_len -= entry.offset
        req.skip_radix_cache_insert = True  # its row is physical: never inserted under logical keys
        setattr(req, ADOPT_ATTR, info)
    entry.last_access = time.monotonic()
    h = entry.handle
    return empty_match._replace(device_prefix_len=entry.physical_length, last_device_node=h, last_host_node=h,
                                best_match_node=h, full_kv_hit_length=entry.physical_length, cache_actions=[])


def set_logical(req: Any) -> None:
    """Undo an adoption (the entry was dropped, or another one fits): logical ids back on the request."""
    info = adoption_of(req)
    if info is None:
        return
    req.origin_input_ids = info.logical_ids
    req.full_untruncated_fill_ids = req.origin_input_ids + req.output_ids
    if req.logprob_start_len >= 0:
        req.logprob_start_len += info.offset
    req.skip_radix_cache_insert = info.skip_insert
    delattr(req, ADOPT_ATTR)


def unadopt(req: Any, params: MatchPrefixParams) -> MatchPrefixParams:
    """The request matches the tree again: logical ids, and the match key rebuilt from them."""
    info = adoption_of(req)
    if info is None:
        return params
    offset = info.offset
    set_logical(req)
    key = params.key
    limit = None if key.limit is None else key.limit + offset
    return MatchPrefixParams(key=RadixKey(token_ids=req.full_untruncated_fill_ids, extra_key=key.extra_key,
                                          limit=limit, cache_salt=key.cache_salt),
                             cow_mamba=params.cow_mamba, req=req)


def shift_positions(ret: Any, reqs: list[Any]) -> tuple[int, list[Hashable]]:
    """Add each adopted request's offset L - P to its positions in the `ForwardBatch` `ret` (RoPE sees
    logical positions). Returns (requests on compacted prefixes, the keys of the entries of those first seen in
    a batch: one new hit each)."""
    mode = ret.forward_mode
    offsets = None
    compressed = 0
    new: list[Hashable] = []
    for i, req in enumerate(reqs):
        info = adoption_of(req)
        if info is None:
            continue
        compressed += 1
        if info.offset:
            if offsets is None:
                offsets = [0] * len(reqs)
            offsets[i] = info.offset
        if not info.counted:
            info.counted = True
            new.append(info.entry.key)
    if offsets is not None:
        off = torch.tensor(offsets, dtype=ret.positions.dtype, device=ret.positions.device)
        if mode.is_decode():
            ret.positions = ret.positions + off
        elif mode.is_extend():
            lens = torch.tensor(ret.extend_seq_lens_cpu, device=ret.positions.device)
            ret.positions = ret.positions + torch.repeat_interleave(off, lens)
        else:  # pragma: no cover - refused at start (speculative decoding)
            raise RuntimeError(f"kvzip-plugin: forward mode {mode} on a compacted prefix")
    return compressed, new


def paged_rows(ret: Any, reqs: list[Any]) -> list[PagedRow]:
    """The batch's requests on head-page entries, for `attention.PagedAttention`."""
    mode = ret.forward_mode
    entries = [(i, info.entry.store) for i, req in enumerate(reqs)
               if (info := adoption_of(req)) is not None and info.entry.store is not None]
    if not entries:
        return []
    if mode.is_decode():
        seq_lens = ret.seq_lens.tolist()
        return [PagedRow(store, int(reqs[i].kv.req_pool_idx), i, 1, int(seq_lens[i])) for i, store in entries]
    if not mode.is_extend():  # pragma: no cover - refused at start (speculative decoding)
        raise RuntimeError(f"kvzip-plugin: forward mode {mode} on a compacted prefix")
    lens, prefix = list(ret.extend_seq_lens_cpu), list(ret.extend_prefix_lens_cpu)
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + int(n))
    return [PagedRow(store, int(reqs[i].kv.req_pool_idx), starts[i], int(lens[i]), int(prefix[i]) + int(lens[i]))
            for i, store in entries]


def logical_view(reqs: list[Any]) -> list[tuple[Any, Any, int, int]]:
    """Show requests on compacted prefixes with their logical prompt and cached-token counts while SGLang
    reports them; returns what `physical_view` restores."""
    saved = []
    for req in reqs:
        info = adoption_of(req)
        if info is None:
            continue
        saved.append((req, req.origin_input_ids, req.cached_tokens, req.cached_tokens_device))
        req.origin_input_ids = info.logical_ids
        if req.cached_tokens:
            req.cached_tokens += info.offset
        if req.cached_tokens_device:
            req.cached_tokens_device += info.offset
    return saved


def physical_view(saved: list[tuple[Any, Any, int, int]]) -> None:
    for req, ids, cached, cached_device in saved:
        req.origin_input_ids, req.cached_tokens, req.cached_tokens_device = ids, cached, cached_device
