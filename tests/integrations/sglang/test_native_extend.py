# SPDX-License-Identifier: Apache-2.0
"""native_extend.py against SGLang's own `TorchNativeAttnBackend._run_sdpa_forward_extend`: scoring rows get the
same attention over their new rows only; every other request of the batch SGLang's exact output."""

from __future__ import annotations

import torch

from tests.integrations.sglang import harness

harness.require_sglang()

from kvzip_plugin.integrations.sglang import native_extend  # noqa: E402

H_Q, H_KV, D, SLOTS = 6, 2, 16, 512


def _batch(seed: int = 0):
    """Three requests extending chunks after cached prefixes: (prefix, extend) = (0, 9), (40, 13), (25, 7)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache = torch.randn(SLOTS, H_KV, D, generator=g), torch.randn(SLOTS, H_KV, D, generator=g)
    prefixes, extends = torch.tensor([0, 40, 25]), torch.tensor([9, 13, 7])
    seq_lens = prefixes + extends
    req_to_token = torch.zeros(4, 128, dtype=torch.long)
    perm = torch.randperm(SLOTS, generator=g)
    for row in range(4):
        req_to_token[row] = perm[row * 128:(row + 1) * 128]
    pools = torch.tensor([2, 0, 3])
    query = torch.randn(int(extends.sum()), H_Q, D, generator=g)
    args = (k_cache, v_cache, req_to_token, pools, seq_lens, prefixes, extends, None)
    return TorchNativeAttnBackend._run_sdpa_forward_extend, query, args


def _run(fn, query, args, rows):
    out = torch.zeros_like(query)
    kwargs = {"scaling": D ** -0.5, "enable_gqa": True, "causal": True, "is_cross_attn": False,
              "sliding_window_size": None}
    with native_extend.scoring_rows(rows):
        native_extend.around_extend(fn, None, query, out, *args, **kwargs)
    return out


def test_scoring_rows_attend_over_their_new_rows_only_and_others_are_sglangs():
    original, query, args = _batch()
    want = torch.zeros_like(query)
    original(None, query, want, *args, scaling=D ** -0.5, enable_gqa=True, causal=True)
    rows_of = {2: slice(0, 9), 0: slice(9, 22), 3: slice(22, 29)}  # req_to_token row -> its query rows
    for scoring in ({0}, {2, 3}, {2, 0, 3}):
        got = _run(original, query, args, frozenset(scoring))
        for row, span in rows_of.items():
            if row in scoring:  # the same attention, other SDPA shapes: float rounding only
                torch.testing.assert_close(got[span], want[span], rtol=1e-5, atol=1e-6)
            else:  # SGLang's own function on the other requests: bit-identical
                assert torch.equal(got[span], want[span])
    # no scoring row in the batch, or none marked: SGLang's function unchanged
    assert torch.equal(_run(original, query, args, frozenset({1})), want)
    assert torch.equal(_run(original, query, args, frozenset()), want)


def test_a_scoring_row_costs_its_tokens_not_its_sequence():
    """The point of the hook: the padded query of SGLang's loop is never built for a scoring row."""
    original, query, args = _batch()
    shapes = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(q, *a, **kw):
        shapes.append(tuple(q.shape))
        return real(q, *a, **kw)

    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        _run(original, query, args, frozenset({0}))
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert (1, H_Q, 13, D) in shapes  # the scoring row: its 13 new queries, not 53 padded ones
    assert (1, H_Q, 53, D) not in shapes
