"""`distill demo`'s summary: its figures (`Summary`, written to summary.json), the paired
differences of every student against SFT alone (`VERDICTS`), and the printed tables and lines."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from distill.demo.budgets import CROSS_STUDENTS, STUDENTS, Budget
from distill.demo.export_check import summary_line
from distill.eval import metrics


@dataclasses.dataclass
class Stage:
    name: str
    seconds: float
    result: str


# verdict: (model, baseline) whose paired difference of per-prompt accuracy it quotes; every
# row of the table against SFT alone, and the cross-tokenizer pair
VERDICTS = {f"{m.removeprefix('student-')}_vs_sft": (m, "student-sft")
            for m in ("teacher", "student-kd", "student-onpolicy", "student-answers",
                      "student-gold", "student-uld", "student-untrained")}
VERDICTS["gold_vs_uld"] = ("student-gold", "student-uld")


@dataclasses.dataclass
class Summary:
    """What a demo run found: written to summary.json (`to_dict`), printed as its tables."""

    budget: str  # the budget's name ("custom" for a Budget passed in)
    student_tokenizer: str
    settings: Budget
    teacher_cached: bool
    stages: list[Stage]
    total_seconds: float
    models: dict[str, dict]  # per model: pass@1, ci95, greedy, format, total/active params
    best_student: str
    verdicts: dict  # "<student>/teacher": pass@1 ratio; VERDICTS keys: [difference, half-width]
    export: dict  # the export stage's checks (`distill.demo.export_check`)
    traces: dict  # records, samples, rejected
    onpolicy: dict  # the on-policy run's first and last logged figures (`onpolicy_stats`)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def verdicts(scores: dict) -> dict:
    """Each trained student's pass@1 over the teacher's, and the paired differences VERDICTS
    names (where both models ran)."""
    teacher = scores["teacher"]["pass@1"]
    verdicts = {}
    trained = [n for n in scores if n not in ("teacher", "student-untrained", "student-answers")]
    for name in trained:
        verdicts[f"{name}/teacher"] = scores[name]["pass@1"] / teacher if teacher else 0.0
    pp = {n: s["per_prompt"] for n, s in scores.items()}
    for key, (a, b_) in VERDICTS.items():
        if a in pp and b_ in pp:  # a list, as JSON reads it back
            verdicts[key] = list(metrics.paired_difference(pp[a], pp[b_]))
    return verdicts


def models(scores: dict, params: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """Per model its scores (without the per-prompt ones) and its total and active parameters."""
    models = {}
    for name, s in scores.items():
        total_p, active_p = params["teacher" if name == "teacher" else "student"]
        models[name] = {k: v for k, v in s.items() if k != "per_prompt"}
        models[name].update(total_params=total_p, active_params=active_p)
    return models


def print_summary(console, s: Summary) -> None:
    n = s.settings.eval_n
    table = Table(title=f"distill demo ({s.budget} budget): held-out accuracy, "
                        f"{s.settings.eval_prompts} prompts")
    for col in ("model", f"pass@1 (n={n}) [95% CI]", "vs SFT alone (paired 95% CI)", "greedy",
                "params (active)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    students = CROSS_STUDENTS if s.student_tokenizer == "other" else STUDENTS
    labels = {"teacher": "teacher (MoE, worked solutions)",
              **{n: label for n, (_, _, label) in students.items()},
              "student-untrained": "student: untrained"}
    for name, m in s.models.items():
        lo, hi = m["ci95"]
        params = f"{m['total_params'] / 1e6:.2f}M ({m['active_params'] / 1e6:.2f}M)"
        paired = s.verdicts.get(f"{name.removeprefix('student-')}_vs_sft")
        vs = "-" if paired is None else f"{100 * paired[0]:+.1f} (+/- {100 * paired[1]:.1f})"
        table.add_row(labels.get(name, name), f"{m['pass@1']:.1%} [{lo:.1%}, {hi:.1%}]", vs,
                      "-" if m["greedy"] is None else f"{m['greedy']:.1%}", params)
    console.print(table)

    stages = Table(title=f"time per stage (total {s.total_seconds:.0f} s)")
    for col in ("stage", "seconds", "result"):
        stages.add_column(col, justify="right" if col == "seconds" else "left")
    for st in s.stages:
        stages.add_row(st.name, f"{st.seconds:.1f}", st.result)
    console.print(stages)
    for line in verdict_lines(s):
        console.print(line)


def _verdict(d: float, h: float) -> str:
    return "helped" if d - h > 0 else "hurt" if d + h < 0 else "no clear difference (within noise)"


def verdict_lines(s: Summary) -> list[str]:
    """The summary's conclusions, one line each: every student against SFT alone, and the
    on-policy phase's targets (issue 29)."""
    v = s.verdicts
    lines = [f"best distilled student: {s.best_student}, pass@1 "
             f"{v[f'{s.best_student}/teacher']:.0%} of the teacher's"]
    for key, what in (("kd_vs_sft", "off-policy KD added to SFT"),
                      ("onpolicy_vs_sft", "SFT then on-policy, against SFT alone"),
                      ("answers_vs_sft", "answers only, against SFT on traces"),
                      ("gold_vs_sft", "GOLD (across tokenizers) added to SFT"),
                      ("uld_vs_sft", "ULD (across tokenizers) added to SFT")):
        if key in v:
            d, h = v[key]
            lines.append(f"{what}: {_verdict(d, h)}, {100 * d:+.1f} points (95% CI +/- "
                         f"{100 * h:.1f})")
    if "gold_vs_uld" in v:
        d, h = v["gold_vs_uld"]
        lines.append(f"GOLD vs ULD: {100 * d:+.1f} points (95% CI +/- {100 * h:.1f})")
    lines += _onpolicy_lines(s)
    lines.append(escape(summary_line(s.export)))  # plain text: "[hf]" is not a style
    return lines


def _met(ok: bool) -> str:
    return "[green]met[/]" if ok else "[red]not met[/]"


def _onpolicy_lines(s: Summary) -> list[str]:
    """The on-policy targets: >= 5 points over SFT alone with the interval above 0, >= 50% of the
    SFT-teacher gap closed, reverse KL on own samples down >= 40%, entropy >= 50% of its start,
    completion length within 25% of the start's."""
    if "onpolicy_vs_sft" not in s.verdicts or not s.onpolicy:
        return []
    d, h = s.verdicts["onpolicy_vs_sft"]
    gap = s.verdicts["teacher_vs_sft"][0]
    closed = d / gap if gap > 0 else float("nan")
    o = s.onpolicy
    kl_drop = 1 - o["kl_end"] / o["kl_start"] if o["kl_start"] else float("nan")
    ent = o["entropy_end"] / o["entropy_start"] if o["entropy_start"] else float("nan")
    length = o["length_end"] / o["length_start"] - 1 if o["length_start"] else float("nan")
    return [f"on-policy: {100 * d:+.1f} points over SFT alone, CI lower end "
            f"{100 * (d - h):+.1f} (target >= +5, above 0): {_met(d >= 0.05 and d - h > 0)}",
            f"on-policy: closes {closed:.0%} of the SFT-teacher gap ({100 * gap:.1f} points; "
            f"target >= 50%): {_met(closed >= 0.5)}",
            f"on-policy phase: reverse KL on own samples {o['kl_start']:.3f} -> {o['kl_end']:.3f} "
            f"({kl_drop:.0%} down, target >= 40%): {_met(kl_drop >= 0.4)}; entropy "
            f"{o['entropy_start']:.3f} -> {o['entropy_end']:.3f} ({ent:.0%} of start, target "
            f">= 50%): {_met(ent >= 0.5)}; completion tokens {o['length_start']:.1f} -> "
            f"{o['length_end']:.1f} ({length:+.0%}, target within 25%): "
            f"{_met(abs(length) <= 0.25)}"]


def onpolicy_stats(run_dir: Path) -> dict:
    """An on-policy run's logged reverse KL on its own samples, token entropy and completion
    length: first and last logged values."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "sampled_reverse_kl" in r]
    out = {}
    for key, col in (("kl", "sampled_reverse_kl"), ("entropy", "entropy"),
                     ("length", "completion_tokens")):
        out[f"{key}_start"], out[f"{key}_end"] = rows[0][col], rows[-1][col]
    return out
