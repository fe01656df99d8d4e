# SPDX-License-Identifier: Apache-2.0
"""SGLang glue: the `sglang.srt.plugins` entry point `kvzip = kvzip_plugin.integrations.sglang:register`.

SGLang calls `register()` in every process (`sglang.srt.plugins.load_plugins`: the launcher before it
parses arguments, `Engine.__init__`, every scheduler, the detokenizer, the DP controller), with no
arguments, and only logs what it raises. `register()` never raises anyway: on an SGLang build other
than the one supported it logs one warning line and changes nothing (fail closed).

What it does on SGLang 0.5.23:

* registers the radix-cache backend `kvzip` (`sglang.srt.mem_cache.registry`), so
  `--radix-cache-backend kvzip` selects it. Its factory builds SGLang's default tree cache with the
  subclass `KVzipRadixCache` (radix_cache.py) through `create_unified_radix_cache(ctx, cache_class=...)`;
  where KVzip cannot work (radix cache disabled, hybrid SWA / Mamba models, DSA, HiCache) or the
  construction fails, it logs one line, counts `sglang:kvzip_fallbacks_total{reason}` (with
  `--enable-metrics`) and builds SGLang's default cache instead (fail closed). `KVzipRadixCache` detects
  hot shared prefixes, scores them with internal requests inside SGLang's own batches, compacts them into
  fresh KV slots and serves later requests from the compacted copy (radix_cache.py, capture.py, hooks.py;
  DESIGN.md); features it cannot handle, found once the pools and the model exist, turn it into SGLang's
  default cache the same way;
* adds `--kv-compression {none,kvzip}`, `--kv-compression-ratio`, `--kv-compression-min-prefix-tokens`,
  `--kv-compression-min-hits` to `ServerArgs.add_cli_args` (`sglang serve`, `python -m
  sglang.launch_server`), through SGLang's `HookRegistry` (AFTER hook). Invalid values fail at parse
  time with argparse's `argument --kv-compression-ratio: ...` message (exit 2);
* maps `--kv-compression kvzip` onto `--radix-cache-backend kvzip` in `ServerArgs.from_cli_args` (AROUND
  hook) and keeps the settings on the record (`server_args._kvzip_settings`, pickled to the scheduler
  processes with it);
* for `Engine(...)` users (no argparse): `KVZIP_KV_COMPRESSION=kvzip` (+ `KVZIP_KV_COMPRESSION_RATIO`,
  `KVZIP_KV_COMPRESSION_MIN_PREFIX_TOKENS`, `KVZIP_KV_COMPRESSION_MIN_HITS`) is read when the record is
  resolved (BEFORE hook on `ServerArgs.resolve_once`); the variables apply to the CLI too when no
  `--kv-compression` flag is given. `Engine(..., radix_cache_backend="kvzip")` works as well.

This module imports SGLang lazily (inside functions), so importing it never fails without SGLang.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Mapping
from typing import Any, Literal

from kvzip_plugin import settings as shared_settings
from kvzip_plugin.registration import Registration
from kvzip_plugin.settings import (  # noqa: F401  (re-exported: the cache, the hooks and the tests use them)
    ENV_MIN_HITS,
    ENV_MIN_PREFIX,
    ENV_MODE,
    ENV_RATIO,
    MODES,
    KVCompressionSettings,
    make_settings,
    settings_from_env,
    validate_min_hits,
    validate_min_prefix_tokens,
    validate_ratio,
)

# A child of SGLang's "sglang" logger name, so its lines look like SGLang's (root handler).
logger = logging.getLogger("sglang.kvzip_plugin")

SUPPORTED_VERSION = (0, 5, 23)
"""The one SGLang release whose internals this integration is written against (release and post
releases of it). Anything else: fail closed."""

BACKEND_NAME = "kvzip"
# MODES, ENV_* and the settings validation are shared with vLLM: kvzip_plugin.settings

SETTINGS_ATTR = "_kvzip_settings"
"""Private (non-field) attribute of SGLang's `ServerArgs` holding the settings as a plain dict, or None
when `--kv-compression none` was given explicitly (then the environment variables are ignored)."""

HOOK_TARGETS = {
    "add_cli_args": "sglang.srt.server_args.ServerArgs.add_cli_args",
    "from_cli_args": "sglang.srt.server_args.ServerArgs.from_cli_args",
    "resolve_once": "sglang.srt.server_args.ServerArgs.resolve_once",
}

_registration = Registration("SGLang", logger)  # once per process; fails closed


# ---------------------------------------------------------------------------------------------
# settings: validation shared by the CLI flags, the environment variables and Engine users
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# support check
# ---------------------------------------------------------------------------------------------


def unsupported_reason(version: str) -> str | None:
    """None if SGLang `version` is supported, else why not (one line)."""
    from packaging.version import InvalidVersion, Version

    want = ".".join(map(str, SUPPORTED_VERSION))
    try:
        parsed = Version(version)
    except InvalidVersion:
        return f"cannot parse the SGLang version {version!r} (supported: {want})"
    if parsed.release[:3] != SUPPORTED_VERSION or parsed.is_prerelease or parsed.is_devrelease:
        return f"SGLang {version} is not supported (supported: {want})"
    return None


def _sglang_version() -> str:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        import sglang

        return str(getattr(sglang, "__version__", "unknown"))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_kv_compression_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--kv-compression*` flags to `parser` (no-op if already there)."""
    return shared_settings.add_kv_compression_args(
        parser, mode_help="Compress the KV cache of shared prefixes. 'kvzip' selects --radix-cache-backend kvzip; "
        "'none' (default) leaves SGLang untouched.", env_applies="when --kv-compression is not given")


def settings_from_args(args: argparse.Namespace) -> tuple[Literal["unset", "none", "kvzip"], KVCompressionSettings]:
    """Read (and re-validate) the flags from `args` (`kvzip_plugin.settings.settings_from_args`)."""
    return shared_settings.settings_from_args(args, logger)


def _check_backend(current: Any, source: str) -> None:
    if current not in (None, BACKEND_NAME):
        raise ValueError(
            f"{source} cannot be combined with --radix-cache-backend {current!r}; drop one of them"
        )


# ---------------------------------------------------------------------------------------------
# hooks (registered with SGLang's HookRegistry)
# ---------------------------------------------------------------------------------------------


def _after_add_cli_args(result: Any, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
    """AFTER `ServerArgs.add_cli_args(parser)` (a staticmethod that returns None)."""
    add_kv_compression_args(parser)
    return None


def _around_from_cli_args(original, cls, args: argparse.Namespace, *rest: Any, **kwargs: Any):
    """AROUND `ServerArgs.from_cli_args(cls, args)`: `--kv-compression kvzip` -> radix_cache_backend."""
    mode, settings = settings_from_args(args)
    if mode == "unset":  # the environment applies: a bad value ends the CLI like a bad flag
        shared_settings.check_env_for_cli("sglang.launch_server")
    if mode == "kvzip":
        _check_backend(getattr(args, "radix_cache_backend", None), "--kv-compression kvzip")
        args = argparse.Namespace(**vars(args))  # never mutate the caller's namespace
        args.radix_cache_backend = BACKEND_NAME
    elif mode == "none" and getattr(args, "radix_cache_backend", None) == BACKEND_NAME:
        raise ValueError("--kv-compression none cannot be combined with --radix-cache-backend kvzip; drop one of them")
    server_args = original(cls, args, *rest, **kwargs)
    if mode == "kvzip":
        setattr(server_args, SETTINGS_ATTR, settings.to_dict())
    elif mode == "none":
        setattr(server_args, SETTINGS_ATTR, None)  # explicit: environment variables do not apply
    return server_args


def _before_resolve_once(server_args: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE `ServerArgs.resolve_once(self)`: the environment variables (Engine users, or the CLI
    without `--kv-compression`) and `radix_cache_backend="kvzip"` given directly. Runs while the record
    is still writable; a no-op on records already resolved (e.g. the scheduler's pickled copy)."""
    if getattr(server_args, "_resolution_finished", False) or getattr(server_args, "_resolution_failed", False):
        return None
    backend = getattr(server_args, "radix_cache_backend", None)
    if SETTINGS_ATTR in getattr(server_args, "__dict__", {}):
        if getattr(server_args, SETTINGS_ATTR) is None:
            return None  # `--kv-compression none`
        # `--kv-compression kvzip`: backend already set by from_cli_args
        return None
    settings = settings_from_env()  # ValueError naming the variable: fails at start
    if settings is not None:
        _check_backend(backend, f"{ENV_MODE}=kvzip")
        if backend is None:
            server_args.radix_cache_backend = BACKEND_NAME
        setattr(server_args, SETTINGS_ATTR, settings.to_dict())
        logger.info("kvzip-plugin: %s=kvzip -> --radix-cache-backend %s", ENV_MODE, BACKEND_NAME)
    elif backend == BACKEND_NAME:
        setattr(server_args, SETTINGS_ATTR, {})  # `--radix-cache-backend kvzip` alone: defaults
    return None


def settings_of(server_args: Any) -> KVCompressionSettings:
    """The settings the kvzip cache of a server uses: those stored on its `ServerArgs` by the hooks,
    else the environment variables, else the defaults."""
    stored = getattr(server_args, SETTINGS_ATTR, None) if server_args is not None else None
    if isinstance(stored, Mapping):
        return KVCompressionSettings.from_dict(stored)
    return settings_from_env() or KVCompressionSettings()


# ---------------------------------------------------------------------------------------------
# the radix-cache backend
# ---------------------------------------------------------------------------------------------


def unsupported_cache_check(ctx: Any) -> tuple[str, str] | None:
    """Why KVzip cannot run with the cache SGLang is building (`TreeCacheBuildContext`): (metric reason
    code, message), or None."""
    if ctx.disable_radix_cache:
        return "radix_cache_disabled", "the radix cache is disabled (--disable-radix-cache)"
    if ctx.is_hybrid_swa:
        return "hybrid_swa", "hybrid sliding-window models are not supported"
    if ctx.is_hybrid_ssm:
        return "hybrid_ssm", "models with Mamba state are not supported"
    if ctx.is_dsa:
        return "dsa", "DSA (sparse attention) models are not supported"
    if ctx.enable_hierarchical_cache:
        return "hicache", "the hierarchical cache (HiCache) is not supported"
    return None


def unsupported_cache_reason(ctx: Any) -> str | None:
    """Why KVzip cannot run with the cache SGLang is building (`TreeCacheBuildContext`), or None."""
    check = unsupported_cache_check(ctx)
    return None if check is None else check[1]


def kvzip_radix_cache_factory(ctx: Any):
    """The `kvzip` radix-cache backend: SGLang's default unified tree cache, as `KVzipRadixCache`.
    Fails closed: where KVzip cannot work, or building it fails, SGLang's default cache is built (one
    warning line, `sglang:kvzip_fallbacks_total{reason}` with --enable-metrics). Features detected once the
    pools and the model exist (speculative decoding, KV layouts, mrope, ...) are refused by
    `KVzipRadixCache` itself, which then behaves as SGLang's default cache."""
    from sglang.srt.mem_cache.registry import create_unified_radix_cache, default_radix_cache_factory

    check = unsupported_cache_check(ctx)
    if check is None:
        try:
            from kvzip_plugin.integrations.sglang.radix_cache import KVzipRadixCache

            settings = settings_of(ctx.server_args)
            cache_class = functools.partial(KVzipRadixCache, settings=settings, tp_worker=ctx.tp_worker,
                                            server_args=ctx.server_args)
            return create_unified_radix_cache(ctx, cache_class=cache_class)
        except Exception as exc:
            check = ("build_failed", f"building KVzipRadixCache failed: {exc!r}")
    code, reason = check
    logger.warning("kvzip-plugin: %s; KV compression disabled, SGLang's default tree cache is used", reason)
    try:
        from kvzip_plugin.integrations.sglang.metrics import report_fallback, served_model_name

        report_fallback(code, bool(getattr(ctx.params, "enable_metrics", False)),
                        served_model_name(getattr(ctx, "server_args", None)))
    except Exception:  # pragma: no cover - never let metrics break the fallback
        pass
    return default_radix_cache_factory(ctx)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def _register_backend() -> None:
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    if get_radix_cache_factory(BACKEND_NAME) is kvzip_radix_cache_factory:
        return
    register_radix_cache_backend(BACKEND_NAME, kvzip_radix_cache_factory)  # ValueError if taken by another


def _register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType, _current_plugin_source

    HookRegistry.register(HOOK_TARGETS["add_cli_args"], _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(HOOK_TARGETS["from_cli_args"], _around_from_cli_args, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS["resolve_once"], _before_resolve_once, HookType.BEFORE)
    if _current_plugin_source.get() is None:
        # Called directly, not from load_plugins() (which applies every plugin's hooks after the last
        # plugin ran): apply now. Targets already patched are skipped by HookRegistry.
        HookRegistry.apply_hooks()


def _patch_sglang() -> None:
    _register_backend()
    _register_hooks()


def register() -> None:
    """The `sglang.srt.plugins` entry point. Idempotent, re-entrant, never raises."""
    _registration.run(lambda: _sglang_version(), unsupported_reason, _patch_sglang)  # late-bound: tests replace it


def is_active() -> bool:
    """True once `register()` has registered the backend and the hooks in this process."""
    return _registration.active
