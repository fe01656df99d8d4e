# SPDX-License-Identifier: Apache-2.0
"""native_backend.py against SGLang's own `TorchNativeAttnBackend._run_sdpa_forward_extend` / `_decode`: scoring
rows get the same attention over their new rows only; rows on head-page entries are not computed (their output
rows are left untouched for the plugin); every other request of the batch gets SGLang's exact output."""

from __future__ import annotations

import torch

from tests.integrations.sglang import harness

harness.require_sglang()

from kvzip_plugin.integrations.sglang import native_backend  # noqa: E402

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


def _run(fn, query, args, rows, skipped=frozenset()):
    out = torch.full_like(query, 7.0)  # what a skipped row must keep
    kwargs = {"scaling": D ** -0.5, "enable_gqa": True, "causal": True, "is_cross_attn": False,
              "sliding_window_size": None}
    with native_backend.rows(rows, skipped):
        native_backend.around_extend(fn, None, query, out, *args, **kwargs)
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


def test_head_page_rows_are_skipped_in_extend_and_others_are_sglangs():
    original, query, args = _batch()
    want = torch.zeros_like(query)
    original(None, query, want, *args, scaling=D ** -0.5, enable_gqa=True, causal=True)
    rows_of = {2: slice(0, 9), 0: slice(9, 22), 3: slice(22, 29)}
    before = native_backend.rows_skipped
    got = _run(original, query, args, frozenset({3}), skipped=frozenset({0}))
    assert native_backend.rows_skipped == before + 1
    assert torch.equal(got[rows_of[0]], torch.full_like(got[rows_of[0]], 7.0))  # left for the plugin
    assert torch.equal(got[rows_of[2]], want[rows_of[2]])  # SGLang's own loop: bit-identical
    torch.testing.assert_close(got[rows_of[3]], want[rows_of[3]], rtol=1e-5, atol=1e-6)  # the scoring row


def _decode_batch(seed: int = 1):
    """Four requests decoding one token each over 17, 60, 5 and 33 cached tokens."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache = torch.randn(SLOTS, H_KV, D, generator=g), torch.randn(SLOTS, H_KV, D, generator=g)
    req_to_token = torch.randperm(SLOTS, generator=g)[:4 * 128].view(4, 128)
    pools, seq_lens = torch.tensor([1, 3, 0, 2]), torch.tensor([17, 60, 5, 33])
    query = torch.randn(4, H_Q, D, generator=g)
    return TorchNativeAttnBackend._run_sdpa_forward_decode, query, (k_cache, v_cache, req_to_token, pools, seq_lens)


def _decode(fn, query, args, skipped, backend=None, **extra):
    out = torch.full_like(query, 7.0)
    kwargs = {"scaling": D ** -0.5, "enable_gqa": True, "causal": False, "is_cross_attn": False,
              "sliding_window_size": None, **extra}
    with native_backend.rows(skipped=skipped):
        native_backend.around_decode(fn, backend, query, out, *args, None, **kwargs)
    return out


def test_head_page_rows_are_skipped_in_decode_and_others_are_sglangs():
    original, query, args = _decode_batch()
    want = torch.zeros_like(query)
    original(None, query, want, *args, None, scaling=D ** -0.5, enable_gqa=True)
    for skipped in ({3}, {1, 2}, {1, 3, 0, 2}, {0, 2}):
        before = native_backend.rows_skipped
        got = _decode(original, query, args, frozenset(skipped))
        assert native_backend.rows_skipped == before + len(skipped)
        for i, pool in enumerate(args[3].tolist()):
            if pool in skipped:
                assert torch.equal(got[i], torch.full_like(got[i], 7.0))
            else:
                assert torch.equal(got[i], want[i])
    # nothing marked, or rows not in this batch: SGLang's function unchanged
    assert torch.equal(_decode(original, query, args, frozenset()), want)
    assert torch.equal(_decode(original, query, args, frozenset({9})), want)


def test_decode_kinds_left_to_sglang_are_never_skipped():
    """A sliding-window layer is computed by SGLang whatever is marked (the plugin never overwrites it)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    original, query, args = _decode_batch()
    backend = TorchNativeAttnBackend.__new__(TorchNativeAttnBackend)  # its mask helper reads no state
    want = torch.zeros_like(query)
    original(backend, query, want, *args, None, scaling=D ** -0.5, enable_gqa=True, sliding_window_size=8)
    assert torch.equal(_decode(original, query, args, frozenset({1}), sliding_window_size=8, backend=backend), want)
