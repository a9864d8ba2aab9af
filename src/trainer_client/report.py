"""A run's report: PNG plots of its metrics and a Markdown page that shows them.

Reads only the run directory (metrics.jsonl, teacher_traffic.json), so it can be rebuilt
for any finished or interrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402

# Fractions the report reads as percentages.
PERCENT_KEYS = {"eval/accuracy", "teacher_wait_fraction"}

# (metric key, plot title, file name)
CURVES = [
    ("loss", "Training loss", "loss.png"),
    ("eval/kl", "KL(teacher || student) on held-out data", "kl.png"),
    ("eval/accuracy", "Held-out accuracy", "accuracy.png"),
    ("teacher_wait_fraction", "Fraction of step time waiting on teachers", "teacher_wait.png"),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def _plot_curve(steps: list[int], values: list[float], title: str, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(steps, values, marker="o" if len(steps) < 30 else None)
    axes.set(title=title, xlabel="step")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_traffic(traffic: dict[str, dict], path: Path) -> None:
    names = list(traffic)
    figure, axes = plt.subplots(figsize=(6, 0.6 * len(names) + 1.5))
    axes.barh(names, [traffic[n].get("requests", 0) for n in names], label="requests")
    axes.barh(names, [traffic[n].get("failures", 0) for n in names], label="failures")
    axes.set(title="Requests per teacher endpoint", xlabel="requests")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


METHOD_STAT_PREFIXES = ("route/", "select/", "judge/", "guided/", "adversarial/", "rl/", "visd/", "on_policy/")


def _method_stats(records: list[dict]) -> dict[str, tuple[float, float]]:
    """Each method statistic's first and last logged value."""
    keys = sorted({key for record in records for key in record if key.startswith(METHOD_STAT_PREFIXES)})
    return {key: (_series(records, key)[1][0], _series(records, key)[1][-1]) for key in keys}


def _shown(key: str, value: float) -> str:
    return f"{value:.1%}" if key in PERCENT_KEYS else f"{value:.4g}"


def write_report(run_dir: str | Path, summary_markdown: str = "", title: str = "Potstill training run") -> Path:
    """Write plots and `report.md` into `run_dir`; returns the report's path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    sections = [f"# {title}\n", summary_markdown]
    for key, caption, file_name in CURVES:
        steps, values = _series(records, key)
        if steps:
            _plot_curve(steps, values, caption, run_dir / file_name)
            sections.append(f"## {caption}\n\n![{caption}]({file_name})\n\nlast: {_shown(key, values[-1])} at step {steps[-1]}\n")
    method_stats = _method_stats(records)
    if method_stats:
        rows = "\n".join(f"| {key} | {first:.3f} | {last:.3f} |" for key, (first, last) in method_stats.items())
        sections.append(
            "## Method statistics\n\nRouting shares per teacher (`route/`), accepted share per sample author (`select/accepted/`), "
            "majority agreement, fallback rate, judge scores (`judge/`), guidance on demand (`guided/`): over the first and "
            f"the last logged window.\n\n| statistic | first | last |\n|---|---|---|\n{rows}\n"
        )
    traffic_path = run_dir / "teacher_traffic.json"
    if traffic_path.exists():
        traffic = json.loads(traffic_path.read_text())
        _plot_traffic(traffic, run_dir / "teacher_traffic.png")
        rows = "\n".join(f"| {name} | " + " | ".join(str(stats.get(k, 0)) for k in ("requests", "failures", "retries")) + " |" for name, stats in traffic.items())
        sections.append(
            "## Teacher traffic\n\n![Teacher traffic](teacher_traffic.png)\n\n"
            f"| endpoint | requests | failures | retries |\n|---|---|---|---|\n{rows}\n"
        )
    report = run_dir / "report.md"
    report.write_text("\n".join(sections))
    return report
