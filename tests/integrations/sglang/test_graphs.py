# SPDX-License-Identifier: Apache-2.0
"""SGLang's graph runners decline the replays of KVzip's batches (`integrations/sglang/graphs.py`), on the
real SGLang 0.5.23 classes. A replay cannot run on this CPU machine (CUDA graphs; SGLang's CPU graphs need
its AMX backend), so these tests check the runners' eligibility answers, the marks `on_forward_batch` sets,
and (test_assumptions.py) that SGLang's model runner asks exactly these checks before replaying."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from kvzip_plugin.integrations.sglang import graphs, hooks  # noqa: E402


@pytest.fixture(scope="module")
def installed():
    from sglang.srt.plugins.hook_registry import HookRegistry

    hooks.install()  # the scheduler's hooks; every one does nothing without an active KVzip cache
    assert set(graphs.RUNNERS) <= HookRegistry._patched
    return True


def test_cpu_graph_runner_keeps_its_answer_for_unmarked_batches(installed):
    """Unmarked batches get SGLang's own answer (batch size within the captured ones); marked ones False."""
    from sglang.srt.model_executor.cpu_graph_runner import CPUGraphRunner

    runner = CPUGraphRunner.__new__(CPUGraphRunner)  # only what its can_run_graph reads
    runner.disable_padding, runner.max_bs, runner.graphs = False, 8, {}
    small, big = SimpleNamespace(batch_size=4), SimpleNamespace(batch_size=16)
    assert runner.can_run_graph(small) is True and runner.can_run_graph(big) is False
    graphs.mark(small, False)
    assert runner.can_run_graph(small) is True
    before = graphs.declined["batches"]
    graphs.mark(small, True)
    assert runner.can_run_graph(small) is False
    assert graphs.declined["batches"] == before + 1


@pytest.mark.parametrize("path", ["decode_cuda_graph_runner.DecodeCudaGraphRunner",
                                  "prefill_cuda_graph_runner.PrefillCudaGraphRunner"])
def test_cuda_graph_runners_decline_marked_batches(installed, path):
    """A marked batch is declined before SGLang's check runs (a bare runner would fail inside it); an
    unmarked one reaches SGLang's check."""
    import importlib

    module, cls = path.split(".")
    runner_cls = getattr(importlib.import_module(f"sglang.srt.model_executor.runner.{module}"), cls)
    runner = runner_cls.__new__(runner_cls)
    batch = SimpleNamespace()
    graphs.mark(batch, True)
    assert runner.can_run_graph(batch) is False
    graphs.mark(batch, False)
    with pytest.raises(AttributeError):  # SGLang's own check, reading what a bare runner lacks
        runner.can_run_graph(batch)


def test_marks_follow_the_plugins_work():
    """`on_forward_batch` marks a batch eager exactly when the plugin works inside its forward: rows on
    head-page entries or a score-capture plan; a batch on a `head` entry (SGLang's kernel reads it) keeps
    its graphs."""
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from tests.integrations.sglang import harness
    from tests.integrations.sglang.test_radix_cache import _cache, _entry, _live, _match, _req

    pools = harness.cpu_pools(torch.float32, max_context_len=64)
    cache = _live(_cache(pools))
    _entry(cache, list(range(100, 108)), 4)  # a `head` entry (no head-page store)
    adopted, plain = _req(list(range(100, 108)) + [1, 2]), _req([5, 6, 7], rid="r1")
    _match(cache, adopted)
    batch = SimpleNamespace(reqs=[plain, adopted])
    decode = SimpleNamespace(forward_mode=ForwardMode.DECODE, positions=torch.tensor([3, 6]))
    cache.on_forward_batch(decode, batch)
    assert graphs.needs_eager(decode) is False

    armed = []
    cache.paged = SimpleNamespace(arm=lambda ret, rows: armed.append(rows))
    cache.on_forward_batch(decode, batch)
    assert armed == [[]] and graphs.needs_eager(decode) is False  # no head-page rows: graphs stay
    cache.paged = None
    cache.capture = SimpleNamespace(targets={"kvzip-score-1": object()}, arm=lambda *a: None,
                                    plan=lambda reqs, prefix, lens: ["a scoring row"])
    extend = SimpleNamespace(forward_mode=ForwardMode.EXTEND, positions=torch.tensor([0, 1, 2, 4, 5]),
                             extend_seq_lens_cpu=[3, 2], extend_prefix_lens_cpu=[0, 4])
    cache.on_forward_batch(extend, batch)
    assert graphs.needs_eager(extend) is True
