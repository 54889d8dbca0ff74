"""`distill eval --thinking-budgets 1024,4096,16384`: the same eval once per thinking budget (s1's
budget forcing, `protocol.thinking_budget`), each a whole report of its own in
`<output>/budget-<N>/`, and beside them a summary: per model and budget, pass@1 with its 95%
interval against the mean thinking tokens the samples spent (budgets.json, budgets.md,
plots/accuracy_vs_thinking.png; teacher and students side by side).
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.config import apply_overrides, parse_overrides, resolve_path, validate
from distill.errors import DistillError
from distill.eval import plots
from distill.eval.config import EvalConfig
from distill.eval.evaluate import load_eval_config, run_eval
from distill.fsutil import FREE, write_atomic, writing

SUMMARY = "budgets.json"


def parse_budgets(text: str) -> list[int]:
    """"1024,4096,16384" -> [1024, 4096, 16384] (distinct, each at least 1), or a DistillError."""
    try:
        budgets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DistillError(f"--thinking-budgets {text!r}: give whole numbers separated by "
                           "commas, e.g. 1024,4096,16384") from None
    bad = next((b for b in budgets if b <= 0), None)
    if not budgets or bad is not None:
        raise DistillError(f"--thinking-budgets {text!r}: every budget must be at least 1 token"
                           + (f" (got {bad})" if bad is not None else ""))
    if len(set(budgets)) != len(budgets):
        raise DistillError(f"--thinking-budgets {text!r}: a budget is given twice")
    return sorted(budgets)


def _config(config_path, overrides, data: dict | None) -> tuple[EvalConfig, Path]:
    """The validated config (`overrides` applied) and the sweep's folder."""
    if data is not None:
        cfg = validate(EvalConfig, apply_overrides(data, parse_overrides(overrides)),
                       "distill eval --benchmark", check_paths=True)
        name = cfg.name
    else:
        cfg = load_eval_config(config_path, overrides, check_paths=True)
        name = cfg.name or Path(config_path).stem
    return cfg, Path(cfg.output or resolve_path(Path("students") / "eval" / name))


def run_budget_sweep(config_path, overrides, budgets: list[int], *, progress: bool = True,
                     data: dict | None = None) -> dict:
    """Evaluate once per budget and write the summary; returns budgets.json's content. Every
    budget is checked against the protocol (below max_new_tokens) before anything runs."""
    _config(config_path, [*overrides, f"protocol.thinking_budget={max(budgets)}"], data)
    cfg, base = _config(config_path, overrides, data)
    reports = {b: run_eval(config_path, [*overrides, f"protocol.thinking_budget={b}",
                                         f"output={base / f'budget-{b}'}"],
                           progress=progress, data=data) for b in budgets}
    summary = summarize(reports)
    summary["output"] = str(base)
    write_summary(base, summary)
    return summary


def summarize(reports: dict[int, dict]) -> dict:
    """budgets.json: per model (students first, the teacher last), a point per budget."""
    models: dict[str, dict] = {}
    for budget, report in sorted(reports.items()):
        for m in report["models"]:
            entry = models.setdefault(m["name"], {"name": m["name"], "role": m["role"],
                                                  "points": []})
            thinking = m.get("thinking") or {}
            entry["points"].append({
                "budget": budget, "pass@1": m["pass@1"], "format": m["format"],
                "answered": m["answered"],
                "mean_thinking_tokens": thinking.get("mean_tokens"),
                "forced": thinking.get("forced"), "report": report["output"]})
    first = reports[min(reports)]
    return {"name": first["name"], "budgets": sorted(reports),
            "protocol": {k: v for k, v in first["protocol"].items() if k != "thinking_budget"},
            "models": sorted(models.values(), key=lambda m: m["role"] == "teacher")}


def markdown(summary: dict) -> str:
    """A row per budget, a column per model: pass@1 [95% CI] and mean thinking tokens."""
    models = summary["models"]
    names = [f"**{m['name']}** (teacher)" if m["role"] == "teacher" else m["name"] for m in models]
    lines = [f"# thinking budgets: {summary['name']}", "",
             f"s1 budget forcing: the think block is closed at the budget and the model answers "
             f"within max_new_tokens {summary['protocol']['max_new_tokens']}; "
             f"{summary['protocol']['n']} samples per prompt. Each cell: pass@1 [95% CI] · mean "
             "thinking tokens · answered (think closed, answer read).", "",
             "| budget | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, budget in enumerate(summary["budgets"]):
        cells = []
        for m in models:
            p = m["points"][i]
            lo, hi = p["pass@1"]["ci95"]
            tokens = p["mean_thinking_tokens"]
            cells.append(f"{100 * p['pass@1']['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] · "
                         f"{'–' if tokens is None else f'{tokens:.0f}'} · {100 * p['answered']:.0f}%")
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(base: Path, summary: dict) -> None:
    """budgets.json, budgets.md and the plot, each written whole (the per-budget reports stay)."""
    safe = f"the per-budget reports in {base} are complete; {FREE} and rerun the same command"
    with writing(base, safe):
        (base / "plots").mkdir(parents=True, exist_ok=True)
        write_atomic(base / "plots" / "accuracy_vs_thinking.png",
                     lambda tmp: plots.accuracy_vs_thinking(summary["models"], tmp))
        write_atomic(base / "budgets.md", markdown(summary).encode())
        write_atomic(base / SUMMARY,
                     (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())
