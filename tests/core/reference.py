# SPDX-License-Identifier: Apache-2.0
"""The reference the decode-path tests compare against: one request's softmax over its prefix masked to the
kept pairs and its own tokens, in float64, head by head."""

from __future__ import annotations

import torch


def masked_attention(q: torch.Tensor, pre_k: torch.Tensor, pre_v: torch.Tensor, keep: torch.Tensor,
                     own_k: torch.Tensor, own_v: torch.Tensor, scale: float) -> torch.Tensor:
    """One request's query `[H_q, D]` over its prefix `[H_kv, L, D]` masked to `keep` `[H_kv, L]` and its own
    tokens `[H_kv, T, D]`: `[H_q, D]` float64."""
    h_q = q.shape[0]
    g = h_q // pre_k.shape[0]
    out = torch.zeros(h_q, q.shape[-1], dtype=torch.float64)
    for j in range(h_q):
        h = j // g
        k = torch.cat([pre_k[h][keep[h]], own_k[h]]).double()
        v = torch.cat([pre_v[h][keep[h]], own_v[h]]).double()
        out[j] = torch.softmax(q[j].double() @ k.T * scale, -1) @ v
    return out
