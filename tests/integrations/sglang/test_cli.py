# SPDX-License-Identifier: Apache-2.0
"""The `--kv-compression*` flags on SGLang 0.5.23's real `ServerArgs` parser, their mapping onto
`--radix-cache-backend kvzip`, the environment variables for `Engine(...)` users, the fail-closed checks,
and start-up failures of the real launcher (`python -m sglang.launch_server`)."""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points

import pytest

from tests.helpers import ListHandler
from tests.integrations.sglang import harness

harness.require_sglang()

import kvzip_plugin.integrations.sglang as plugin  # noqa: E402
import msgspec  # noqa: E402
from sglang.srt.mem_cache.registry import get_radix_cache_factory  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

from kvzip_plugin.registration import Registration  # noqa: E402


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    plugin.register()
    assert plugin.is_active(), plugin._registration.reason
    p = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(p)  # SGLang's own builder, with the plugin's AFTER hook
    return p


def server_args(parser, *argv: str) -> ServerArgs:
    """What `prepare_server_args` does (parse + `ServerArgs.from_cli_args`), without its logging setup."""
    return ServerArgs.from_cli_args(parser.parse_args(["--model-path", "dummy", *argv]))


def fields(record: ServerArgs) -> dict:
    return msgspec.structs.asdict(record)


# --------------------------------------------------------------------------- registration


def test_entry_point_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("kvzip") == "kvzip_plugin.integrations.sglang:register"


def test_register_is_idempotent(parser):
    plugin.register()
    plugin.register()
    assert get_radix_cache_factory("kvzip") is plugin.kvzip_radix_cache_factory
    flags = [a for a in parser._actions if "--kv-compression" in a.option_strings]
    assert len(flags) == 1


def test_hooks_wrap_sglang_methods(parser):
    for name in ("add_cli_args", "from_cli_args", "resolve_once"):
        raw = ServerArgs.__dict__[name]
        func = getattr(raw, "__func__", raw)
        assert hasattr(func, "__wrapped__"), name  # HookRegistry's wrapper
    assert isinstance(ServerArgs.__dict__["add_cli_args"], staticmethod)
    assert isinstance(ServerArgs.__dict__["from_cli_args"], classmethod)


# --------------------------------------------------------------------------- flags


def test_flags_appear(parser):
    opts = {o for a in parser._actions for o in a.option_strings}
    assert {"--kv-compression", "--kv-compression-ratio", "--kv-compression-min-prefix-tokens",
            "--kv-compression-min-hits", "--radix-cache-backend"} <= opts
    help_text = parser.format_help()
    assert "KVzip compression of shared prefixes" in help_text


def test_no_flag_and_none_leave_server_args_untouched(parser):
    plain = server_args(parser)
    none = server_args(parser, "--kv-compression", "none")
    assert fields(plain) == fields(none)
    assert plain.radix_cache_backend is None
    assert plugin.SETTINGS_ATTR not in plain.__dict__
    assert getattr(none, plugin.SETTINGS_ATTR) is None  # explicit none: env vars ignored later
    # identical to what SGLang builds from the namespace without the plugin's hook
    unwrapped = ServerArgs.__dict__["from_cli_args"].__func__.__wrapped__
    assert fields(unwrapped(ServerArgs, parser.parse_args(["--model-path", "dummy"]))) == fields(plain)


def test_kvzip_selects_the_backend(parser):
    args = parser.parse_args(["--model-path", "dummy", "--kv-compression", "kvzip", "--kv-compression-ratio", "0.5",
                              "--kv-compression-min-prefix-tokens", "256", "--kv-compression-min-hits", "3"])
    record = ServerArgs.from_cli_args(args)
    assert record.radix_cache_backend == "kvzip"
    assert getattr(record, plugin.SETTINGS_ATTR) == {"ratio": 0.5, "min_prefix_tokens": 256, "min_hits": 3}
    assert args.radix_cache_backend is None  # the caller's namespace is not mutated
    # every other field is that of a plain run
    plain = fields(server_args(parser))
    plain["radix_cache_backend"] = "kvzip"
    assert fields(record) == plain
    assert plugin.settings_of(record) == plugin.KVCompressionSettings(0.5, 256, 3)


def test_settings_survive_pickling(parser):
    """The scheduler gets ServerArgs by pickle (spawn); the settings ride in its __dict__."""
    import pickle

    record = server_args(parser, "--kv-compression", "kvzip", "--kv-compression-ratio", "0.25")
    copy = pickle.loads(pickle.dumps(record))
    assert copy.radix_cache_backend == "kvzip"
    assert getattr(copy, plugin.SETTINGS_ATTR) == {"ratio": 0.25}


def test_radix_cache_backend_kvzip_alone(parser):
    record = server_args(parser, "--radix-cache-backend", "kvzip")
    assert record.radix_cache_backend == "kvzip"
    assert plugin.settings_of(record) == plugin.KVCompressionSettings()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kv-compression", "yes"], "argument --kv-compression: invalid choice: 'yes'"),
        (["--kv-compression-ratio", "1.5"],
         "argument --kv-compression-ratio: ratio: Input should be less than or equal to 1"),
        (["--kv-compression-ratio", "0"], "argument --kv-compression-ratio: ratio: Input should be greater than 0"),
        (["--kv-compression-min-prefix-tokens", "0"],
         "argument --kv-compression-min-prefix-tokens: min_prefix_tokens: Input should be greater than or equal to 1"),
        (["--kv-compression-min-hits", "x"], "argument --kv-compression-min-hits: min_hits: Input should be a valid"),
        (["--kv-compression-structure", "layer"], "argument --kv-compression-structure: invalid choice: 'layer'"),
    ],
)
def test_invalid_values_fail_at_parse(parser, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--model-path", "dummy", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_structure_flag_and_env_reach_the_cache(parser, monkeypatch):
    for structure in ("pair", "layer_budget", "head"):
        record = server_args(parser, "--kv-compression", "kvzip", "--kv-compression-structure", structure)
        assert getattr(record, plugin.SETTINGS_ATTR) == {"structure": structure}
        assert plugin.settings_of(record).structure == structure
    assert "{pair,layer_budget,head}" in " ".join(parser.format_help().split())
    monkeypatch.setenv("KVZIP_KV_COMPRESSION", "kvzip")
    monkeypatch.setenv("KVZIP_KV_COMPRESSION_STRUCTURE", "layer_budget")
    record = ServerArgs(model_path="dummy")
    plugin._before_resolve_once(record)
    assert plugin.settings_of(record).structure == "layer_budget"
    monkeypatch.setenv("KVZIP_KV_COMPRESSION_STRUCTURE", "layer")
    with pytest.raises(ValueError, match="KVZIP_KV_COMPRESSION_STRUCTURE: structure: invalid choice 'layer'"):
        plugin._before_resolve_once(ServerArgs(model_path="dummy"))


def test_conflicting_backend_is_refused(parser):
    with pytest.raises(ValueError, match="cannot be combined with --radix-cache-backend 'other'"):
        server_args(parser, "--kv-compression", "kvzip", "--radix-cache-backend", "other")
    with pytest.raises(ValueError, match="--kv-compression none cannot be combined"):
        server_args(parser, "--kv-compression", "none", "--radix-cache-backend", "kvzip")


def test_namespace_not_from_parser_is_validated(parser):
    args = parser.parse_args(["--model-path", "dummy", "--kv-compression", "kvzip"])
    args.kv_compression_ratio = 7.0
    with pytest.raises(ValueError, match="--kv-compression-ratio"):
        ServerArgs.from_cli_args(args)


# --------------------------------------------------------------------------- environment (Engine users)


def test_env_selects_kvzip_before_resolution(parser, monkeypatch):
    """The BEFORE hook on `ServerArgs.resolve_once` (what `Engine(...)` and the CLI both call), applied
    to a record as `Engine(model_path=...)` builds it."""
    monkeypatch.setenv(plugin.ENV_MODE, "kvzip")
    monkeypatch.setenv(plugin.ENV_MIN_PREFIX, "64")
    record = ServerArgs(model_path="dummy")
    plugin._before_resolve_once(record)
    assert record.radix_cache_backend == "kvzip"
    assert plugin.settings_of(record) == plugin.KVCompressionSettings(min_prefix_tokens=64)


def test_explicit_none_flag_wins_over_env(parser, monkeypatch):
    monkeypatch.setenv(plugin.ENV_MODE, "kvzip")
    record = server_args(parser, "--kv-compression", "none")
    plugin._before_resolve_once(record)
    assert record.radix_cache_backend is None


def test_env_unset_leaves_record_alone(parser, monkeypatch):
    monkeypatch.delenv(plugin.ENV_MODE, raising=False)
    record = ServerArgs(model_path="dummy")
    before = fields(record)
    plugin._before_resolve_once(record)
    assert fields(record) == before


def test_env_with_other_backend_is_refused(parser, monkeypatch):
    monkeypatch.setenv(plugin.ENV_MODE, "kvzip")
    with pytest.raises(ValueError, match="KVZIP_KV_COMPRESSION=kvzip cannot be combined"):
        plugin._before_resolve_once(ServerArgs(model_path="dummy", radix_cache_backend="other"))


# --------------------------------------------------------------------------- fail closed


@pytest.mark.parametrize(
    ("version", "ok"),
    [("0.5.23", True), ("0.5.23.post1", True), ("0.5.22", False), ("0.5.24", False), ("0.5.23rc1", False),
     ("0.6.0", False), ("garbage", False)],
)
def test_unsupported_reason(version, ok):
    assert (plugin.unsupported_reason(version) is None) == ok


def test_unsupported_version_changes_nothing(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(plugin, "_registration", Registration("SGLang", plugin.logger))
    monkeypatch.setattr(plugin, "_sglang_version", lambda: "0.5.22")
    hooks_before = {k: list(v) for k, v in HookRegistry._hooks.items()}
    handler = ListHandler()
    plugin.logger.addHandler(handler)
    try:
        plugin.register()
    finally:
        plugin.logger.removeHandler(handler)
    assert not plugin.is_active()
    assert {k: list(v) for k, v in HookRegistry._hooks.items()} == hooks_before
    assert len(handler.messages) == 1 and "SGLang 0.5.22 is not supported" in handler.messages[0], handler.messages


def test_register_never_raises(monkeypatch):
    monkeypatch.setattr(plugin, "_registration", Registration("SGLang", plugin.logger))

    def boom():
        raise RuntimeError("boom")

    monkeypatch.setattr(plugin, "_sglang_version", boom)
    plugin.register()
    assert not plugin.is_active() and "boom" in plugin._registration.reason


def test_unsupported_cache_reason():
    from types import SimpleNamespace

    base = dict(disable_radix_cache=False, is_hybrid_swa=False, is_hybrid_ssm=False, is_dsa=False,
                enable_hierarchical_cache=False)
    assert plugin.unsupported_cache_reason(SimpleNamespace(**base)) is None
    for key, word in [("disable_radix_cache", "disabled"), ("is_hybrid_swa", "sliding-window"),
                      ("is_hybrid_ssm", "Mamba"), ("is_dsa", "DSA"), ("enable_hierarchical_cache", "HiCache")]:
        assert word in plugin.unsupported_cache_reason(SimpleNamespace(**{**base, key: True}))


# --------------------------------------------------------------------------- the real launcher


def test_launcher_rejects_invalid_ratio_at_start(sglang_tiny_model_dir):
    """`python -m sglang.launch_server` exits 2 before loading anything, naming the flag. ~15 s."""
    proc = harness.run_launcher("--model-path", str(sglang_tiny_model_dir), "--kv-compression", "kvzip",
                                "--kv-compression-ratio", "1.5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "argument --kv-compression-ratio: ratio: Input should be less than or equal to 1" in proc.stderr


def test_launcher_rejects_invalid_env_at_start(sglang_tiny_model_dir):
    """KVZIP_* variables are checked when the launcher resolves its ServerArgs (before any subprocess)."""
    proc = harness.run_launcher(*harness.launch_command(sglang_tiny_model_dir)[3:],
                                KVZIP_KV_COMPRESSION="kvzip", KVZIP_KV_COMPRESSION_MIN_HITS="0")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]  # like a bad flag: one line, no traceback
    assert ("sglang.launch_server: error: KVZIP_KV_COMPRESSION_MIN_HITS: min_hits: Input should be greater than or "
            "equal to 1") in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
