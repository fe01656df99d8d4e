# SPDX-License-Identifier: Apache-2.0
"""The `--kv-compression*` flags on vLLM's real `vllm serve` parser, their mapping onto EngineArgs,
the environment variables for `LLM(...)` users, and the fail-closed version check."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

import pytest

from tests.helpers import ListHandler

vllm = pytest.importorskip("vllm")

import kvzip_plugin.integrations.vllm as plugin  # noqa: E402
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs  # noqa: E402

from kvzip_plugin.registration import Registration  # noqa: E402

try:  # `vllm serve`'s parser: .launchers.cli_args in 0.32, .common.cli_args in 0.33
    from vllm.entrypoints.launchers.cli_args import make_arg_parser  # noqa: E402
except ImportError:
    from vllm.entrypoints.common.cli_args import make_arg_parser  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

MODEL = "/nonexistent/model"  # parsing and EngineArgs never touch the model


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in (plugin.ENV_MODE, plugin.ENV_RATIO, plugin.ENV_MIN_PREFIX, plugin.ENV_MIN_HITS):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def parser():
    plugin.register()
    assert plugin.is_active(), plugin._registration.reason
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def parse(parser, *argv):
    return parser.parse_args(["--model", MODEL, *argv])


def test_entry_point_declared():
    """pyproject.toml declares it; a stale install (`pip install -e .` not re-run) lacks it."""
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("kvzip") == "kvzip_plugin.integrations.vllm:register"


def test_register_is_idempotent(parser):
    add, from_cli, create = EngineArgs.add_cli_args, EngineArgs.from_cli_args, EngineArgs.create_engine_config
    plugin.register()
    plugin._registration.done = False  # even a forced second pass must not wrap twice
    plugin.register()
    assert EngineArgs.add_cli_args is add
    assert EngineArgs.from_cli_args.__func__ is from_cli.__func__
    assert EngineArgs.create_engine_config is create
    assert getattr(EngineArgs.add_cli_args, "__wrapped__", None) is not None
    assert not hasattr(EngineArgs.add_cli_args.__wrapped__, "__wrapped__")
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    assert plugin.CONNECTOR_NAME in KVConnectorFactory._registry


def test_parser_has_flags(parser):
    args = parse(parser)
    assert args.kv_compression is None
    assert args.kv_compression_ratio is None
    assert args.kv_compression_min_prefix_tokens is None
    assert args.kv_compression_min_hits is None
    help_text = parser.format_help()
    for flag in ("--kv-compression", "--kv-compression-ratio", "--kv-compression-min-prefix-tokens",
                 "--kv-compression-min-hits"):
        assert flag in help_text
    args = parse(parser, "--kv-compression", "kvzip", "--kv-compression-ratio", "0.25",
                 "--kv-compression-min-prefix-tokens", "64", "--kv-compression-min-hits", "3")
    assert (args.kv_compression, args.kv_compression_ratio) == ("kvzip", 0.25)
    assert (args.kv_compression_min_prefix_tokens, args.kv_compression_min_hits) == (64, 3)


@pytest.mark.parametrize(
    ("argv", "flag", "words"),
    [
        (["--kv-compression-ratio", "1.5"], "--kv-compression-ratio", "less than or equal to 1"),
        (["--kv-compression-ratio", "0"], "--kv-compression-ratio", "greater than 0"),
        (["--kv-compression-ratio", "abc"], "--kv-compression-ratio", "ratio"),
        (["--kv-compression-min-prefix-tokens", "0"], "--kv-compression-min-prefix-tokens", "min_prefix_tokens"),
        (["--kv-compression-min-hits", "0"], "--kv-compression-min-hits", "greater than or equal to 1"),
        (["--kv-compression-min-hits", "2.5"], "--kv-compression-min-hits", "integer"),
        (["--kv-compression", "zip"], "--kv-compression", "invalid choice"),
        (["--kv-compression-structure", "layer"], "--kv-compression-structure", "invalid choice"),
    ],
)
def test_invalid_values_fail_naming_the_flag(parser, capsys, argv, flag, words):
    with pytest.raises(SystemExit) as exc:
        parse(parser, "--kv-compression", "kvzip", *argv) if argv[0] != "--kv-compression" else parse(parser, *argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and words in err, err


def test_none_equals_no_flag(parser):
    plain = AsyncEngineArgs.from_cli_args(parse(parser))
    none = AsyncEngineArgs.from_cli_args(parse(parser, "--kv-compression", "none"))
    assert type(plain) is type(none) is AsyncEngineArgs
    assert plain == none
    assert plain.kv_transfer_config is None
    # ... and equal to what vLLM itself builds from the namespace, without the plugin's wrapper
    unwrapped = EngineArgs.from_cli_args.__func__.__wrapped__(AsyncEngineArgs, parse(parser))
    assert unwrapped == plain


def test_kvzip_maps_onto_kv_transfer_config(parser):
    args = parse(parser, "--kv-compression", "kvzip", "--kv-compression-ratio", "0.5")
    engine_args = AsyncEngineArgs.from_cli_args(args)
    cfg = engine_args.kv_transfer_config
    assert cfg.kv_connector == "KVzipConnector"
    assert cfg.kv_connector_module_path == "kvzip_plugin.integrations.vllm.connector"
    assert cfg.kv_role == "kv_both"
    assert cfg.kv_connector_extra_config == {"kvzip": {"ratio": 0.5}}
    assert not hasattr(args, "kv_transfer_config") or args.kv_transfer_config is None  # caller's untouched
    # the rest of the engine arguments are those of a plain run
    plain = AsyncEngineArgs.from_cli_args(parse(parser))
    plain.kv_transfer_config = cfg
    assert plain == engine_args


def test_structure_flag_reaches_the_connector(parser):
    args = parse(parser, "--kv-compression", "kvzip", "--kv-compression-structure", "layer_budget")
    cfg = AsyncEngineArgs.from_cli_args(args).kv_transfer_config
    assert cfg.kv_connector_extra_config == {"kvzip": {"structure": "layer_budget"}}
    help_text = " ".join(parser.format_help().split())
    assert "--kv-compression-structure {pair,layer_budget,head}" in help_text, help_text[-3000:]


def test_kvzip_with_another_connector_is_refused(parser):
    args = parse(parser, "--kv-compression", "kvzip",
                 "--kv-transfer-config", '{"kv_connector": "ExampleConnector", "kv_role": "kv_both"}')
    with pytest.raises(ValueError, match="cannot be combined with --kv-transfer-config"):
        AsyncEngineArgs.from_cli_args(args)


def test_namespace_not_from_parser_is_validated(parser):
    args = parse(parser, "--kv-compression", "kvzip")
    args.kv_compression_ratio = 7.0
    with pytest.raises(ValueError, match="--kv-compression-ratio"):
        AsyncEngineArgs.from_cli_args(args)


def test_connector_class_resolves(parser):
    from kvzip_plugin.integrations.vllm.connector import KVzipConnector
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    by_path = KVTransferConfig(**plugin.kv_transfer_config(ratio=0.3))
    by_name = KVTransferConfig(kv_connector="KVzipConnector", kv_role="kv_both")
    assert KVConnectorFactory.get_connector_class(by_path) is KVzipConnector
    assert KVConnectorFactory.get_connector_class(by_name) is KVzipConnector


# --------------------------------------------------------------------------- environment (LLM users)


def _engine_args(model_dir: Path, **kw) -> EngineArgs:
    return EngineArgs(model=str(model_dir), max_model_len=256, block_size=32, enforce_eager=True, **kw)


def test_env_turns_kvzip_on_in_create_engine_config(parser, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(plugin.ENV_MODE, "kvzip")
    monkeypatch.setenv(plugin.ENV_RATIO, "0.6")
    config = _engine_args(tiny_model_dir).create_engine_config()
    assert config.kv_transfer_config.kv_connector == "KVzipConnector"
    assert config.kv_transfer_config.kv_connector_extra_config == {"kvzip": {"ratio": 0.6}}


def test_a_second_engine_with_kvzip_reads_the_v1_runner_choice_past_vllms_env_cache(monkeypatch):
    """A first engine without KVzip freezes vLLM's environment cache with VLLM_USE_V2_MODEL_RUNNER unset; a
    later engine with KVzip must still see the V1 choice the plugin sets (on 0.33 CUDA it landed on Model
    Runner V2 and KVzip turned itself off)."""
    import vllm.envs as envs

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "")  # restored after the test, whatever the plugin sets
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    envs.enable_envs_cache()  # what a first engine's start does (vllm/v1/engine/core.py)
    try:
        assert envs.VLLM_USE_V2_MODEL_RUNNER is None
        plugin._prefer_v1_model_runner()
        assert envs.VLLM_USE_V2_MODEL_RUNNER is False
    finally:
        envs.disable_envs_cache()


def _omp_manager(connector: str | None, monkeypatch, reserved: str | None = None):
    """vLLM's own CPU thread planner for a config with `connector` (it reads only these fields)."""
    from types import SimpleNamespace

    from vllm.utils.ompmultiprocessing import OMPProcessManager

    if reserved is None:
        monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", reserved)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    parallel = SimpleNamespace(local_world_size=1, data_parallel_rank_local=None, _api_process_count=1)
    kv = None if connector is None else SimpleNamespace(kv_connector=connector)
    return OMPProcessManager(SimpleNamespace(parallel_config=parallel, kv_transfer_config=kv))


def test_kvzip_runs_the_same_cpu_threads_as_none(parser, monkeypatch):
    """vLLM CPU reserves a core more for any KV connector (P/D transfer); KVzip's connector needs none, so
    `--kv-compression kvzip` and `none` must bind the same OMP threads (a fair comparison; on 2 cores
    kvzip got 2 threads and none 1 before). Another connector keeps vLLM's extra reservation."""
    none = _omp_manager(None, monkeypatch)
    kvzip = _omp_manager(plugin.CONNECTOR_NAME, monkeypatch)
    other = _omp_manager("NixlConnector", monkeypatch)
    assert (kvzip.reserve_cpu_num, kvzip.cpu_lists, kvzip.reserved_cpu_list) == (
        none.reserve_cpu_num, none.cpu_lists, none.reserved_cpu_list)
    assert other.reserve_cpu_num == none.reserve_cpu_num + 1
    assert _omp_manager(plugin.CONNECTOR_NAME, monkeypatch, reserved="0").reserve_cpu_num == 0  # the user's choice


def test_env_unset_leaves_config_alone(parser, tiny_model_dir):
    assert _engine_args(tiny_model_dir).create_engine_config().kv_transfer_config is None


def test_explicit_none_flag_wins_over_env(parser, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(plugin.ENV_MODE, "kvzip")
    args = parser.parse_args(["--model", str(tiny_model_dir), "--max-model-len", "256", "--kv-compression", "none"])
    assert EngineArgs.from_cli_args(args).create_engine_config().kv_transfer_config is None


def test_invalid_env_fails_at_start(parser, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(plugin.ENV_MODE, "kvzip")
    monkeypatch.setenv(plugin.ENV_MIN_HITS, "0")
    with pytest.raises(ValueError, match=plugin.ENV_MIN_HITS):
        _engine_args(tiny_model_dir).create_engine_config()


def test_invalid_env_ends_the_cli_like_a_bad_flag(parser, tiny_model_dir, monkeypatch, capsys):
    """On the command line (no --kv-compression flag) a bad KVZIP_* value is one line and exit 2, not a traceback."""
    monkeypatch.setenv(plugin.ENV_MODE, "kvzip")
    monkeypatch.setenv(plugin.ENV_RATIO, "nan")
    args = parser.parse_args(["--model", str(tiny_model_dir), "--max-model-len", "256"])
    with pytest.raises(SystemExit) as exc:
        EngineArgs.from_cli_args(args)
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("vllm serve: error: KVZIP_KV_COMPRESSION_RATIO: ratio: Input should be a finite "
                                       "number (got 'nan')\n")


# --------------------------------------------------------------------------- fail closed


@pytest.mark.parametrize(
    ("version", "device", "ok"),
    [
        ("0.32.0", "cpu", True),
        ("0.32.3", None, True),
        ("0.33.0", "cuda", True),
        ("0.33.1rc1", "cuda", True),
        ("0.32.0", "cuda", False),
        ("0.33.0", "cpu", False),
        ("0.31.9", "cpu", False),
        ("0.34.0", "cuda", False),
        ("garbage", "cpu", False),
    ],
)
def test_unsupported_reason(version, device, ok):
    assert (plugin.unsupported_reason(version, device) is None) == ok


def test_unsupported_version_changes_nothing(parser, monkeypatch):
    # start from vLLM's own (unwrapped) EngineArgs; monkeypatch restores everything afterwards
    for name in ("add_cli_args", "from_cli_args", "create_engine_config"):
        static = EngineArgs.__dict__[name]
        func = getattr(static, "__func__", static)
        orig = type(static)(func.__wrapped__) if isinstance(static, (staticmethod, classmethod)) else func.__wrapped__
        monkeypatch.setattr(EngineArgs, name, orig)
    before = {n: EngineArgs.__dict__[n] for n in ("add_cli_args", "from_cli_args", "create_engine_config")}
    monkeypatch.setattr(plugin, "_registration", Registration("vLLM", plugin.logger))
    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    handler = ListHandler()  # vLLM's "vllm" logger may not propagate to the root (caplog)
    plugin.logger.addHandler(handler)
    try:
        plugin.register()
    finally:
        plugin.logger.removeHandler(handler)
    assert not plugin.is_active()
    assert {n: EngineArgs.__dict__[n] for n in before} == before
    assert len(handler.messages) == 1 and "0.31.0 is not supported" in handler.messages[0], handler.messages


# --------------------------------------------------------------------------- the real `vllm serve`


def _serve_command() -> list[str]:
    """`vllm serve`, or where the `vllm` script cannot start (vllm-cpu 0.32.0: its CLI asks
    importlib.metadata for the distribution "vllm", which is named "vllm-cpu"), the same server's
    module entry point, which builds the same parser (make_arg_parser) and has no such lookup."""
    try:
        version("vllm")
        vllm_bin = Path(sys.executable).with_name("vllm")
        if vllm_bin.exists():
            return [str(vllm_bin), "serve", MODEL]
    except PackageNotFoundError:
        pass
    return [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", MODEL]


def test_server_rejects_invalid_ratio_at_start():
    """The API server exits 2 before loading anything, naming the flag. ~10 s (imports vLLM)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZIP_")}
    proc = subprocess.run(
        [*_serve_command(), "--kv-compression", "kvzip", "--kv-compression-ratio", "1.5"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "argument --kv-compression-ratio: ratio: Input should be less than or equal to 1" in proc.stderr
