# SPDX-License-Identifier: Apache-2.0
"""Test-harness shim 1 of 2: the `torchvision::nms` / `torchvision::qnms` operator schemas.

SGLang 0.5.23 imports torchvision at start-up (`sglang/srt/configs/__init__.py` -> `nano_nemotron_vl.py` ->
`multimodal/internvl_utils.py`: `import torchvision.transforms`). The only torchvision on PyPI for torch
2.13 (0.28.0) is a CUDA build: its `_C.so` cannot load beside CPU torch, so torchvision runs without its
operators and then dies in `torchvision/_meta_registrations.py` (`torch.library.register_fake
("torchvision::nms")`: "operator torchvision::nms does not exist"). Defining the two schemas first lets
torchvision import; calling them still fails (no kernel), which the text-only paths never do.

Loaded only by the SGLang tests: `define()` from their conftest (in-process tests) and from
`sitecustomize.py` beside this file (server subprocesses get this folder on PYTHONPATH).
"""

from __future__ import annotations

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_libs: list = []  # a torch.library.Library lives as long as its Python object


def define() -> None:
    """Define the missing schemas (idempotent; a no-op where torchvision's own operators exist)."""
    import torch

    missing = [name for name in _SCHEMAS if not _has_op(torch, name)]
    if not missing:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_SCHEMAS[name])
    _libs.append(lib)


def _has_op(torch, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False
