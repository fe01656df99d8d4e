# SPDX-License-Identifier: Apache-2.0
"""GPU kernels (Triton) for the engines' hot paths.

Each kernel module guards its `triton` import: the package imports without Triton, and a kernel
raises ImportError only when it is called.
"""
