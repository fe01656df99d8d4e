# SPDX-License-Identifier: Apache-2.0
"""Every KVZIP_* environment variable, read in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """KVZIP_CACHE_DIR: where converted models are kept (default ~/.cache/kvzip-plugin)."""
    return Path(os.environ.get("KVZIP_CACHE_DIR", Path.home() / ".cache" / "kvzip-plugin"))
