# SPDX-License-Identifier: Apache-2.0
"""Runs at interpreter start-up in SGLang server subprocesses of the tests (this folder is put on their
PYTHONPATH; spawned scheduler/detokenizer processes inherit it). Test harness only.

Makes the real SGLang 0.5.23 server start on a CPU without the official (AMX Xeon, source-built) CPU
kernels: defines the torchvision operator schemas (torchvision_ops.py); the `sgl_kernel` package beside
this file is found through the same PYTHONPATH entry.
"""

try:
    import torchvision_ops

    torchvision_ops.define()
except Exception as exc:  # never break interpreter start-up
    import sys

    print(f"kvzip test shim: torchvision schemas not defined: {exc!r}", file=sys.stderr)
