# SPDX-License-Identifier: Apache-2.0
"""`--kv-compression*` settings shared by the engine integrations (vLLM, SGLang).

One validation (and one set of CLI flags) for every way a user sets them: CLI flags, `KVZIP_KV_COMPRESSION*` environment
variables (for `LLM(...)` / `Engine(...)` users) and Python helpers. Every invalid value raises a
ValueError naming the field (the pydantic models `KVzipConfig` and `TriggerPolicy` are the source of
truth for the bounds).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

MODES = ("none", "kvzip")

ENV_MODE = "KVZIP_KV_COMPRESSION"
ENV_RATIO = "KVZIP_KV_COMPRESSION_RATIO"
ENV_MIN_PREFIX = "KVZIP_KV_COMPRESSION_MIN_PREFIX_TOKENS"
ENV_MIN_HITS = "KVZIP_KV_COMPRESSION_MIN_HITS"
ENV_STRUCTURE = "KVZIP_KV_COMPRESSION_STRUCTURE"
ENV_SCORER = "KVZIP_KV_COMPRESSION_SCORER"
ENV_HEAD_SCORES = "KVZIP_KV_COMPRESSION_HEAD_SCORES"
ENV_SCORING_STEP_TOKENS = "KVZIP_KV_COMPRESSION_SCORING_STEP_TOKENS"
ENV_SCORING_MAX_SLOWDOWN = "KVZIP_KV_COMPRESSION_SCORING_MAX_SLOWDOWN"
ENV_DISPLACE_FACTOR = "KVZIP_KV_COMPRESSION_DISPLACE_FACTOR"

SCORERS = ("kvzip", "kvzip_head")
"""`kvzip`: KVzip's context-dependent scores (a scoring pass per prefix). `kvzip_head`: the
context-independent head-level variant (one score per (layer, KV head) from a calibration file: no
scoring pass, whole heads kept or dropped), served through the same `pair` store."""

STRUCTURES = ("pair", "layer_budget", "head")
"""What `--kv-compression-structure` accepts (`kvzip_plugin.store.SERVED_STRUCTURES`): `pair` (one
global threshold: each (layer, KV head) keeps its own count; KVzip's default), `layer_budget` (each
layer its own count, the same for its KV heads), `head` (the same count everywhere)."""
DEFAULT_STRUCTURE = "pair"
"""Both engines' default: KVzip's own, the one that keeps the answers (benchmarks/README.md)."""


@dataclasses.dataclass(frozen=True)
class KVCompressionSettings:
    """What `--kv-compression kvzip` asks for (vLLM keeps it in `kv_connector_extra_config["kvzip"]`)."""

    ratio: float | None = None
    """Fraction of the prefix's KV pairs kept (`KVzipConfig.ratio`); None = KVzipConfig's default."""
    min_prefix_tokens: int | None = None
    """Shortest shared prefix that is compressed (`TriggerPolicy.min_prefix_tokens`); None = default."""
    min_hits: int | None = None
    """Requests that must hit a prefix before it is compressed (`TriggerPolicy.min_hits`); None = default."""
    structure: str | None = None
    """Eviction structure (`STRUCTURES`); None = `DEFAULT_STRUCTURE`."""
    scorer: str | None = None
    """`SCORERS`; None = `kvzip`."""
    head_scores: str | None = None
    """Head-score file for `kvzip_head` (`kvzip_plugin.head_scores`); None = the file shipped for the model."""
    scoring_step_tokens: int | None = None
    """Scoring tokens per engine step (`slicing.ScoringBudget.step_tokens`; 0 = no slicing); None = default."""
    scoring_max_slowdown: float | None = None
    """Step-time slowdown scoring may cause clients (`slicing.ScoringBudget.target_slowdown`); None = default."""
    displace_factor: float | None = None
    """How many times a compacted prefix's hits a job's prefix needs to displace it (`retention.HitMeter`);
    None = `retention.DISPLACE_FACTOR`."""

    def scoring_budget(self) -> Any:
        """The `slicing.ScoringBudget` these settings ask for (unset fields: its defaults)."""
        from kvzip_plugin.slicing import ScoringBudget

        given = {"step_tokens": self.scoring_step_tokens, "target_slowdown": self.scoring_max_slowdown}
        return ScoringBudget(**{k: v for k, v in given.items() if v is not None})

    def hit_meter(self) -> Any:
        """The `retention.HitMeter` these settings ask for (unset: its default displace factor)."""
        from kvzip_plugin.retention import HitMeter

        return HitMeter() if self.displace_factor is None else HitMeter(displace_factor=self.displace_factor)

    def to_dict(self) -> dict[str, Any]:
        """The values that were set (what an engine stores in its config and passes to its processes)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    to_extra_config = to_dict  # vLLM: `kv_connector_extra_config["kvzip"]`

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> KVCompressionSettings:
        data = dict(data or {})
        return make_settings(data.get("ratio"), data.get("min_prefix_tokens"), data.get("min_hits"),
                             data.get("structure"), data.get("scorer"), data.get("head_scores"),
                             data.get("scoring_step_tokens"), data.get("scoring_max_slowdown"),
                             data.get("displace_factor"))


def _first_error(exc: Exception) -> str:
    """The readable part of a pydantic ValidationError (first error), else str(exc)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            return f"{loc}: {first.get('msg', exc)}" if loc else str(first.get("msg", exc))
        except Exception:  # pragma: no cover - defensive
            pass
    return str(exc)


def _validated(model: Any, field: str, value: Any) -> Any:
    """`value` as the pydantic `model`'s `field` accepts it; ValueError naming the field otherwise."""
    try:
        return getattr(model(**{field: value}), field)
    except Exception as exc:
        raise ValueError(f"{_first_error(exc)} (got {value!r})") from None


def validate_ratio(value: Any) -> float:
    """A ratio accepted by `KVzipConfig.ratio` (in (0, 1]); raises ValueError naming the field."""
    from kvzip_plugin.config import KVzipConfig

    return float(_validated(KVzipConfig, "ratio", value))


def validate_min_prefix_tokens(value: Any) -> int:
    """A token count accepted by `TriggerPolicy.min_prefix_tokens` (>= 1)."""
    from kvzip_plugin.detection import TriggerPolicy

    return int(_validated(TriggerPolicy, "min_prefix_tokens", value))


def validate_min_hits(value: Any) -> int:
    """A hit count accepted by `TriggerPolicy.min_hits` (>= 1)."""
    from kvzip_plugin.detection import TriggerPolicy

    return int(_validated(TriggerPolicy, "min_hits", value))


def validate_structure(value: Any) -> str:
    """One of `STRUCTURES`; raises ValueError naming the field."""
    text = str(value).strip().lower()
    if text not in STRUCTURES:
        raise ValueError(f"structure: invalid choice {value!r} (choose from {', '.join(STRUCTURES)})")
    return text


def validate_scorer(value: Any) -> str:
    """One of `SCORERS`; raises ValueError naming the field."""
    text = str(value).strip().lower()
    if text not in SCORERS:
        raise ValueError(f"scorer: invalid choice {value!r} (choose from {', '.join(SCORERS)})")
    return text


def validate_scoring_step_tokens(value: Any) -> int:
    """A token count accepted by `ScoringBudget.step_tokens` (>= 0; 0 = no slicing)."""
    from kvzip_plugin.slicing import ScoringBudget

    return int(_validated(ScoringBudget, "step_tokens", value))


def validate_scoring_max_slowdown(value: Any) -> float:
    """A slowdown accepted by `ScoringBudget.target_slowdown` (a finite number > 1)."""
    from kvzip_plugin.slicing import ScoringBudget

    return float(_validated(ScoringBudget, "target_slowdown", value))


def validate_displace_factor(value: Any) -> float:
    """A displace factor accepted by `retention.HitMeter.displace_factor` (a finite number >= 0; 0 = a job may
    displace any compacted prefix, the engines' own LRU order)."""
    from kvzip_plugin.retention import HitMeter

    try:
        factor = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"displace_factor: not a number (got {value!r})") from None
    return float(_validated(HitMeter, "displace_factor", factor))


def validate_head_scores(value: Any) -> str:
    """An existing head-score file; raises ValueError naming the field."""
    path = os.path.expanduser(str(value).strip())
    if not os.path.isfile(path):
        raise ValueError(f"head_scores: no such file: {value!r}")
    return path


def make_settings(
    ratio: Any = None, min_prefix_tokens: Any = None, min_hits: Any = None, structure: Any = None,
    scorer: Any = None, head_scores: Any = None, scoring_step_tokens: Any = None, scoring_max_slowdown: Any = None,
    displace_factor: Any = None,
) -> KVCompressionSettings:
    """Validated settings; raises ValueError naming the offending field."""
    settings = KVCompressionSettings(
        ratio=None if ratio is None else validate_ratio(ratio),
        min_prefix_tokens=None if min_prefix_tokens is None else validate_min_prefix_tokens(min_prefix_tokens),
        min_hits=None if min_hits is None else validate_min_hits(min_hits),
        structure=None if structure is None else validate_structure(structure),
        scorer=None if scorer is None else validate_scorer(scorer),
        head_scores=None if head_scores is None else validate_head_scores(head_scores),
        scoring_step_tokens=None if scoring_step_tokens is None else validate_scoring_step_tokens(scoring_step_tokens),
        scoring_max_slowdown=(None if scoring_max_slowdown is None
                              else validate_scoring_max_slowdown(scoring_max_slowdown)),
        displace_factor=None if displace_factor is None else validate_displace_factor(displace_factor),
    )
    if settings.scorer == "kvzip_head" and (settings.structure or DEFAULT_STRUCTURE) != "pair":
        raise ValueError(f"scorer: 'kvzip_head' keeps whole heads through the pair store and needs structure "
                         f"'pair', got {settings.structure!r}")
    if settings.head_scores is not None and settings.scorer != "kvzip_head":
        raise ValueError("head_scores: a head-score file is only read by the scorer 'kvzip_head'")
    return settings


def settings_from_env(environ: Mapping[str, str] | None = None) -> KVCompressionSettings | None:
    """`KVZIP_KV_COMPRESSION=kvzip` (+ knobs) -> settings; unset or `none` -> None.
    Invalid values raise ValueError naming the environment variable."""
    env = os.environ if environ is None else environ
    mode = env.get(ENV_MODE, "").strip().lower() or "none"
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}: invalid choice {mode!r} (choose from {', '.join(MODES)})")
    if mode == "none":
        return None
    values: dict[str, Any] = {}
    for var, key, check in (
        (ENV_RATIO, "ratio", validate_ratio),
        (ENV_MIN_PREFIX, "min_prefix_tokens", validate_min_prefix_tokens),
        (ENV_MIN_HITS, "min_hits", validate_min_hits),
        (ENV_STRUCTURE, "structure", validate_structure),
        (ENV_SCORER, "scorer", validate_scorer),
        (ENV_HEAD_SCORES, "head_scores", validate_head_scores),
        (ENV_SCORING_STEP_TOKENS, "scoring_step_tokens", validate_scoring_step_tokens),
        (ENV_SCORING_MAX_SLOWDOWN, "scoring_max_slowdown", validate_scoring_max_slowdown),
        (ENV_DISPLACE_FACTOR, "displace_factor", validate_displace_factor),
    ):
        raw = env.get(var, "").strip()
        if not raw:
            continue
        try:
            values[key] = check(raw)
        except ValueError as exc:
            raise ValueError(f"{var}: {exc}") from None
    try:
        return make_settings(**values)
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        var = {"scorer": ENV_SCORER, "head_scores": ENV_HEAD_SCORES}.get(field, ENV_MODE)
        raise ValueError(f"{var}: {exc}") from None


def check_env_for_cli(prog: str) -> None:
    """On a server's command line (flags not given): invalid `KVZIP_KV_COMPRESSION*` values end the
    program with one line naming the variable and exit status 2, as an invalid flag does (not a
    traceback). Python API users (`LLM(...)`, `Engine(...)`) get the ValueError instead."""
    try:
        settings_from_env()
    except ValueError as exc:
        import sys

        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------------
# CLI flags (added to vLLM's and SGLang's parsers by their glue)
# ---------------------------------------------------------------------------------------------

FLAGS = {
    "ratio": "--kv-compression-ratio",
    "min_prefix_tokens": "--kv-compression-min-prefix-tokens",
    "min_hits": "--kv-compression-min-hits",
    "structure": "--kv-compression-structure",
    "scorer": "--kv-compression-scorer",
    "head_scores": "--kv-compression-head-scores",
    "scoring_step_tokens": "--kv-compression-scoring-step-tokens",
    "scoring_max_slowdown": "--kv-compression-scoring-max-slowdown",
    "displace_factor": "--kv-compression-displace-factor",
}
"""Settings field -> its flag (the argparse destination is the flag without dashes)."""


def _argparse_type(check):
    def convert(text: str):
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = check.__name__.replace("validate_", "")
    return convert


def add_kv_compression_args(parser: argparse.ArgumentParser, *, mode_help: str,
                            env_applies: str) -> argparse.ArgumentParser:
    """Add the `--kv-compression*` flags to `parser` (no-op if already there). `mode_help` is the
    engine's help of `--kv-compression`; `env_applies` says when the environment variables apply."""
    if any("--kv-compression" in a.option_strings for a in parser._actions):
        return parser
    group = parser.add_argument_group(
        title="KVzip",
        description="KVzip compression of shared prefixes (kvzip-plugin). Environment variables "
        f"{ENV_MODE}, {ENV_RATIO}, {ENV_MIN_PREFIX}, {ENV_MIN_HITS}, {ENV_STRUCTURE}, {ENV_SCORER}, "
        f"{ENV_HEAD_SCORES}, {ENV_SCORING_STEP_TOKENS}, {ENV_SCORING_MAX_SLOWDOWN}, {ENV_DISPLACE_FACTOR} apply "
        f"{env_applies}.",
    )
    group.add_argument("--kv-compression", choices=MODES, default=None, help=mode_help)
    group.add_argument(
        FLAGS["ratio"],
        type=_argparse_type(validate_ratio),
        default=None,
        metavar="FLOAT",
        help="Fraction of a prefix's KV pairs kept, in (0, 1] (KVzipConfig.ratio; default 0.3).",
    )
    group.add_argument(
        FLAGS["min_prefix_tokens"],
        type=_argparse_type(validate_min_prefix_tokens),
        default=None,
        metavar="INT",
        help="Shortest shared prefix that is compressed, in tokens, >= 1 (default 1024).",
    )
    group.add_argument(
        FLAGS["min_hits"],
        type=_argparse_type(validate_min_hits),
        default=None,
        metavar="INT",
        help="Requests that must hit a prefix before it is compressed, >= 1 (default 2).",
    )
    group.add_argument(
        FLAGS["structure"],
        choices=STRUCTURES,
        default=None,
        help="How the kept pairs are budgeted: 'pair' (KVzip's default: one global score threshold, so every "
        "layer and KV head keeps its own count; the most accurate), 'layer_budget' (each layer its own count, "
        "the same for all its KV heads), 'head' (the same count in every layer and KV head; served by the "
        f"engine's own attention kernel, least accurate). Default: {DEFAULT_STRUCTURE}.",
    )
    group.add_argument(
        FLAGS["scorer"],
        choices=SCORERS,
        default=None,
        help="How pairs are scored: 'kvzip' (default: KVzip's scoring pass over each prefix, context-dependent) "
        "or 'kvzip_head' (context-independent head scores from a calibration file: no scoring pass, whole "
        "(layer, KV head) spans kept or dropped; needs structure 'pair').",
    )
    group.add_argument(
        FLAGS["head_scores"],
        type=_argparse_type(validate_head_scores),
        default=None,
        metavar="PATH",
        help="Head-score file for --kv-compression-scorer kvzip_head (`kvzip calibrate-heads` makes one); "
        "default: the file shipped for the model, matched by its architecture.",
    )
    group.add_argument(
        FLAGS["scoring_step_tokens"],
        type=_argparse_type(validate_scoring_step_tokens),
        default=None,
        metavar="INT",
        help="Scoring tokens a compression job may add to one engine step, >= 0 (default 256). Scoring runs "
        "as a low-priority workload: never in a step where a client request waits or prefills (for at most "
        "2 s), then in slices of this many tokens beside the running requests. 0: no slicing (a job's "
        "scoring prefills run whole, as fast as possible, stalling the requests that share their steps).",
    )
    group.add_argument(
        FLAGS["scoring_max_slowdown"],
        type=_argparse_type(validate_scoring_max_slowdown),
        default=None,
        metavar="FLOAT",
        help="Step-time slowdown a compression job may cause the running requests, > 1 (default 1.2). Slices "
        "share decode steps while those steps stay within it; where even the smallest slice exceeds it (a "
        "CPU), scoring runs only in steps without clients (sized to delay a request arriving then by at most "
        "this share of a prefill step), and under a load that never leaves room, one small slice per 30 s.",
    )
    group.add_argument(
        FLAGS["displace_factor"],
        type=_argparse_type(validate_displace_factor),
        default=None,
        metavar="FLOAT",
        help="A compression job may evict a compressed prefix to make room for its scoring only when its own "
        "prefix has been hit more than this many times as often (hits decay with a 10-minute half-life), >= 0 "
        "(default 2: tenants with the same traffic keep each other's compressed prefixes). 0: any compressed "
        "prefix is room, evicted in the engine's LRU order. Client requests always evict what they need.",
    )
    return parser


def settings_from_args(args: argparse.Namespace,
                       logger: logging.Logger) -> tuple[Literal["unset", "none", "kvzip"], KVCompressionSettings]:
    """Read (and re-validate, for namespaces not built by the parser) the flags from `args`; warns on
    `logger` about knobs given without `--kv-compression kvzip`."""
    mode = getattr(args, "kv_compression", None)
    if mode is None:
        mode = "unset"
    elif mode not in MODES:
        raise ValueError(f"--kv-compression: invalid choice {mode!r} (choose from {', '.join(MODES)})")
    raw = {field: getattr(args, flag[2:].replace("-", "_"), None) for field, flag in FLAGS.items()}
    try:
        settings = make_settings(**raw)
    except ValueError as exc:
        flag = FLAGS.get(str(exc).split(":", 1)[0], "--kv-compression")
        raise ValueError(f"{flag}: {exc}") from None
    given = [FLAGS[field] for field, value in raw.items() if value is not None]
    if given and mode != "kvzip":
        logger.warning("kvzip-plugin: %s ignored without --kv-compression kvzip", ", ".join(given))
    return mode, settings
