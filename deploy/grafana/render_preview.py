# SPDX-License-Identifier: Apache-2.0
"""Draw deploy/grafana/kvzip-vllm-preview.png (or another dashboard's preview): the dashboard's layout
(gridPos, titles, units, legends) filled with the real query results that tests/deploy/test_prometheus_e2e.py
(vLLM) or test_prometheus_e2e_sglang.py (SGLang) got from Prometheus scraping real servers. A stand-in for a
Grafana screenshot (Grafana itself is not installable from the package registries this project can reach);
matplotlib draws it.

    KVZIP_DEPLOY_DUMP=/tmp/kvzip-dump.json python -m pytest -q tests/deploy/test_prometheus_e2e.py
    python deploy/grafana/render_preview.py /tmp/kvzip-dump.json     # needs matplotlib
    KVZIP_DEPLOY_DUMP_SGLANG=/tmp/sglang-dump.json python -m pytest -q tests/deploy/test_prometheus_e2e_sglang.py
    python deploy/grafana/render_preview.py /tmp/sglang-dump.json --dashboard deploy/grafana/kvzip-sglang.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
BG, PANEL, FG, MUTED = "#111217", "#181b1f", "#ccccdc", "#8e8e9e"
COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#fade2a"]
SCALE = {"bytes": (1 / 2**20, "MiB"), "percentunit": (100, "%"), "s": (1000, "ms"), "x": (1, "x"),
         "reqps": (1, "req/s"), "short": (1, "")}


def _legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def _fmt(value: float, unit: str) -> str:
    factor, suffix = SCALE.get(unit, (1, ""))
    v = value * factor
    text = f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
    return f"{text} {suffix}".strip()


def render(dump_path: Path, out: Path, dashboard: Path = HERE / "kvzip-vllm.json") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(dashboard.read_text())
    dump = json.loads(dump_path.read_text())
    t0 = dump["start"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dash["panels"])
    unit_h = 0.42
    fig = plt.figure(figsize=(22, rows * unit_h + 1.2), facecolor=BG)
    top = 1 - 1.0 / (rows * unit_h + 1.2)
    fig.text(0.01, 1 - 0.35 / (rows * unit_h + 1.2), f"{dash['title']}   |   model_name=tiny, instance=All",
             color=FG, fontsize=15, weight="bold", va="center")
    fig.text(0.99, 1 - 0.35 / (rows * unit_h + 1.2), "rendered from real Prometheus data of "
             "the tests/deploy end-to-end tests (not a Grafana screenshot)", color=MUTED, fontsize=9,
             ha="right", va="center")

    def box(g: dict) -> list[float]:
        pad = 0.004
        return [g["x"] / 24 + pad, top - (g["y"] + g["h"]) / rows * top + pad * 2,
                g["w"] / 24 - 2 * pad, g["h"] / rows * top - pad * 4]

    for p in dash["panels"]:
        g = p["gridPos"]
        if p["type"] == "row":
            fig.text(g["x"] / 24 + 0.005, top - (g["y"] + 0.5) / rows * top, p["title"], color=FG, fontsize=12,
                     weight="bold", va="center")
            continue
        ax = fig.add_axes(box(g), facecolor=PANEL)
        for side in ax.spines.values():
            side.set_color("#2c3235")
        ax.tick_params(colors=MUTED, labelsize=7)
        unit = p["fieldConfig"]["defaults"].get("unit", "short")
        factor, suffix = SCALE.get(unit, (1, ""))
        results = dump["panels"].get(p["title"], {})
        ax.set_title(p["title"] + (f"  ({suffix})" if suffix and p["type"] != "stat" else ""), color=FG,
                     fontsize=9, loc="left")
        if p["type"] == "stat":
            ax.set_xticks([]), ax.set_yticks([])
            series = results.get("A", [])
            vals = [float(v) for _, v in series[0]["values"]] if series else []
            last = next((v for v in reversed(vals) if math.isfinite(v)), None)
            ax.text(0.5, 0.45, "No data" if last is None else _fmt(last, unit), color=COLORS[0],
                    fontsize=22, weight="bold", ha="center", va="center", transform=ax.transAxes)
            continue
        n = 0
        for target in p["targets"]:
            for s in results.get(target["refId"], []):
                xs = [float(t) - t0 for t, _ in s["values"]]
                ys = [float(v) * factor for _, v in s["values"]]
                ax.plot(xs, ys, color=COLORS[n % len(COLORS)], lw=1.3,
                        label=_legend(target["legendFormat"], s["metric"]) or target["refId"])
                n += 1
        if n == 0:
            ax.text(0.5, 0.5, "No data", color=MUTED, ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=6.5, facecolor=PANEL, edgecolor="#2c3235", labelcolor=FG, loc="upper left",
                      ncol=2 if n > 3 else 1)
        ax.grid(color="#2c3235", lw=0.5)
        ax.set_xlabel("seconds since the load started", color=MUTED, fontsize=7)
    fig.savefig(out, dpi=70, facecolor=BG)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump", type=Path, help="the KVZIP_DEPLOY_DUMP(_SGLANG) file of a tests/deploy e2e test")
    ap.add_argument("--dashboard", type=Path, default=HERE / "kvzip-vllm.json", help="the dashboard JSON")
    ap.add_argument("--out", type=Path, help="default: <dashboard>-preview.png beside the dashboard")
    args = ap.parse_args()
    render(args.dump, args.out or args.dashboard.with_name(args.dashboard.stem + "-preview.png"), args.dashboard)


if __name__ == "__main__":
    main()
