# SPDX-License-Identifier: Apache-2.0
"""Graph replays declined for the forward batches the plugin must see run eagerly.

SGLang replays decode batches from CUDA graphs (`DecodeCudaGraphRunner`; `CPUGraphRunner` on CPU with
torch.compile) and, by default on CUDA, prefill batches from breakable CUDA graphs
(`PrefillCudaGraphRunner`). A replay runs the attention backend's kernel alone, so the two places where the
plugin works inside the forward would be skipped:

* the score capture of a scoring batch (`capture.py`, around `RadixAttention.forward`): the job's chunks
  would get no scores, or only some (their pairs then keep score 0 and are evicted first);
* the head-page attention of requests on `pair` / `layer_budget` entries (`attention.py`): those rows would
  keep the kernel's output over the entry's slots (wrong answers).

`KVzipRadixCache.on_forward_batch` marks such a batch when SGLang builds it (`ForwardBatch.init_new`); the
AROUND hooks on each runner's `can_run_graph` (`hooks.py`) answer False for a marked batch, and SGLang's
model runner then runs it eagerly (`ModelRunner._forward_raw`). Every other batch (client prefills and
decodes on full prefixes or on `head` entries, whose slots SGLang's own kernel reads) keeps its graphs.
Tensor-parallel ranks build the same batch, so they decide alike.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("sglang.kvzip_plugin")

EAGER_ATTR = "kvzip_eager"
"""Attribute set on a `ForwardBatch`: True when a graph replay would skip the plugin's work in it."""

RUNNERS = (
    "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph",
    "sglang.srt.model_executor.runner.prefill_cuda_graph_runner.PrefillCudaGraphRunner.can_run_graph",
    "sglang.srt.model_executor.cpu_graph_runner.CPUGraphRunner.can_run_graph",
)
"""The graph runners' eligibility checks that `hooks.py` wraps (SGLang 0.5.23, pinned in the tests)."""

declined = {"batches": 0}
"""Replays declined in this process (logged on the first one)."""


marks = {"eager": 0, "graphs": 0}
"""Batches marked in this process, by verdict (the cache's state dump shows them)."""


def mark(forward_batch: Any, eager: bool) -> None:
    """Record on the batch whether it must run eagerly (scoring rows, or rows on head-page entries)."""
    setattr(forward_batch, EAGER_ATTR, eager)
    marks["eager" if eager else "graphs"] += 1


def needs_eager(forward_batch: Any) -> bool:
    return bool(getattr(forward_batch, EAGER_ATTR, False))


def around_can_run_graph(original, runner: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> bool:
    """A runner's `can_run_graph`: False for a marked batch, SGLang's own answer otherwise."""
    if needs_eager(forward_batch):
        if declined["batches"] == 0:
            logger.info("kvzip-plugin: %s declines its graph for a batch with scoring rows or requests on "
                        "head-page entries (such batches run eagerly)", type(runner).__name__)
        declined["batches"] += 1
        return False
    return original(runner, forward_batch, *args, **kwargs)
