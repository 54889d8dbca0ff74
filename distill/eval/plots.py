"""The PNG plots of `distill eval` (matplotlib, Agg backend).

Figures are built with `matplotlib.figure.Figure` and an Agg canvas, never `pyplot`: no global
backend switch, no GUI, safe in any process.

- accuracy_ci.png: pass@1 per model with its 95% interval, cons@n and greedy accuracy as markers.
- accuracy_by_difficulty.png: pass@1 per difficulty level per model, with intervals (only when
  prompts carry a difficulty).
- lengths.png: the distribution of completion lengths (tokens) per model.
- loss_curve.png: training loss (and held-out loss) against step, per model with a metrics.jsonl.
- accuracy_vs_thinking.png (`distill eval --thinking-budgets`): pass@1 with its interval against
  the mean thinking tokens per budget, a line per model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

log = logging.getLogger(__name__)

_DPI = 120


def _figure(width: float = 7.0, height: float = 4.2):
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _label(model: dict) -> str:
    return f"{model['name']} (teacher)" if model["role"] == "teacher" else model["name"]


def _ordered(models: list[dict]) -> list[dict]:
    """Students first, the teacher last (as in the Markdown table)."""
    return sorted(models, key=lambda m: m["role"] == "teacher")


def accuracy_ci(models: list[dict], path: Path) -> None:
    """Bars of pass@1 with 95% interval whiskers; cons@n and greedy as markers."""
    models = _ordered(models)
    fig, ax = _figure()
    x = np.arange(len(models))
    value = np.array([m["pass@1"]["value"] for m in models])
    lo = np.array([m["pass@1"]["ci95"][0] for m in models])
    hi = np.array([m["pass@1"]["ci95"][1] for m in models])
    colors = ["tab:orange" if m["role"] == "teacher" else "tab:blue" for m in models]
    ax.bar(x, value, color=colors, alpha=0.8, label="pass@1 (95% CI)")
    ax.errorbar(x, value, yerr=[value - lo, hi - value], fmt="none", ecolor="black", capsize=5)
    ax.scatter(x, [m["cons@n"]["value"] for m in models], marker="D", color="black",
               zorder=3, label="cons@n")
    greedy = [(i, m["greedy"]["value"]) for i, m in enumerate(models) if m["greedy"]]
    if greedy:
        ax.scatter(*zip(*greedy, strict=True), marker="x", s=60, color="tab:red", zorder=3,
                   label="greedy")
    ax.set_xticks(x, [_label(m) for m in models], rotation=15, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy per model")
    ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path)


def accuracy_by_difficulty(models: list[dict], path: Path) -> bool:
    """pass@1 against difficulty, a line per model; False (nothing written) without difficulties."""
    models = [m for m in _ordered(models) if m["by_difficulty"]]
    if not models:
        return False
    levels = list(dict.fromkeys(d for m in models for d in m["by_difficulty"]))
    fig, ax = _figure()
    x = np.arange(len(levels))
    for j, m in enumerate(models):
        shift = (j - (len(models) - 1) / 2) * 0.06  # keep the whiskers apart
        pts = [(i + shift, m["by_difficulty"][d]) for i, d in enumerate(levels)
               if d in m["by_difficulty"]]
        xs = np.array([p for p, _ in pts])
        v = np.array([s["pass@1"] for _, s in pts])
        lo = np.array([s["ci95"][0] for _, s in pts])
        hi = np.array([s["ci95"][1] for _, s in pts])
        ax.errorbar(xs, v, yerr=[v - lo, hi - v], marker="o", capsize=4, label=_label(m))
    ax.set_xticks(x, levels)
    ax.set_xlabel("difficulty")
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass@1")
    ax.set_title("accuracy by difficulty (95% CI)")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return True


def lengths(per_model: dict[str, list[int]], path: Path) -> None:
    """Overlaid step histograms of completion lengths, with each model's mean marked."""
    fig, ax = _figure()
    values = [v for v in per_model.values() if v]
    top = max((max(v) for v in values), default=1)
    bins = np.linspace(0, max(top, 1), 31)
    for (name, tokens), color in zip(per_model.items(), _colors(len(per_model)), strict=True):
        if not tokens:
            continue
        ax.hist(tokens, bins=bins, histtype="step", linewidth=1.5, color=color,
                label=f"{name} (mean {np.mean(tokens):.0f})")
        ax.axvline(float(np.mean(tokens)), color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("completion length (tokens)")
    ax.set_ylabel("samples")
    ax.set_title("response lengths")
    ax.legend(fontsize="small")
    fig.savefig(path)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; unreadable lines (e.g. one being written) are skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: not JSON, skipped", path, lineno)
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int | float):
                rows.append(row)
    return rows


def loss_curve(curves: dict[str, list[dict]], path: Path) -> bool:
    """Training loss (solid) and held-out loss (dashed) against step; False when no file has a
    loss."""
    fig, ax = _figure()
    drawn = False
    for (name, rows), color in zip(curves.items(), _colors(len(curves)), strict=True):
        # held-out losses are sparse (every eval interval): marked, so a single one shows
        for key, style in (("loss", "-"), ("heldout_loss", "--o")):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=color, markersize=4,
                        label=f"{name} {key}")
                drawn = True
    if not drawn:
        return False
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training loss")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return True


def _colors(n: int) -> list:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def write_all(plot_dir: Path, models: list[dict], per_model_lengths: dict[str, list[int]],
              metrics_files: dict[str, Path]) -> list[Path]:
    """Every plot that has data, into `plot_dir`; returns the files written."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_dir / "accuracy_ci.png", plot_dir / "lengths.png"]
    accuracy_ci(models, written[0])
    lengths(per_model_lengths, written[1])
    if accuracy_by_difficulty(models, plot_dir / "accuracy_by_difficulty.png"):
        written.append(plot_dir / "accuracy_by_difficulty.png")
    curves = {name: read_metrics(p) for name, p in metrics_files.items()}
    if curves and loss_curve(curves, plot_dir / "loss_curve.png"):
        written.append(plot_dir / "loss_curve.png")
    return written


def accuracy_vs_thinking(models: list[dict], path: Path) -> None:
    """pass@1 (95% interval whiskers) against the mean thinking tokens per budget, a line per
    model (`distill eval --thinking-budgets`), each point labelled with its budget."""
    fig, ax = _figure()
    for model, color in zip(_ordered(models), _colors(len(models)), strict=True):
        points = [p for p in model["points"] if p["mean_thinking_tokens"] is not None]
        if not points:
            continue
        x = np.array([p["mean_thinking_tokens"] for p in points])
        y = np.array([p["pass@1"]["value"] for p in points])
        lo = np.array([p["pass@1"]["ci95"][0] for p in points])
        hi = np.array([p["pass@1"]["ci95"][1] for p in points])
        ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=4, color=color,
                    linestyle="--" if model["role"] == "teacher" else "-", label=_label(model))
        for p, xi, yi in zip(points, x, y, strict=True):
            ax.annotate(str(p["budget"]), (xi, yi), textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small", color=color)
    ax.set_xscale("log")
    budgets = sorted({p["budget"] for m in models for p in m["points"]})
    ax.set_xticks(budgets, [str(b) for b in budgets])  # plain numbers at the budgets
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("mean thinking tokens (label: budget)")
    ax.set_ylabel("pass@1")
    ax.set_ylim(0, 1)
    ax.set_title("accuracy against thinking tokens (budget forcing)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, format="png")
