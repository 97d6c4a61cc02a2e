"""Results of `qkv eval` for people and programs: a markdown table, JSON, a bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from qkv.eval.harness import RANDOM_BASELINE, TaskResult, core_score


def _cell(r: TaskResult, metric: str) -> str:
    if metric not in r.metrics:
        return "-"
    return f"{r.metrics[metric]:.4f} ± {r.metrics.get(metric + '_stderr', 0.0):.4f}"


def markdown_table(results: dict[str, dict[str, TaskResult]]) -> str:
    """One row per task and metric, one column per model; CORE (centered mean) last."""
    models = list(results)
    tasks = list(dict.fromkeys(t for per in results.values() for t in per))
    lines = [
        "| task | metric | n | shots | chance | " + " | ".join(models) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(models),
    ]
    for t in tasks:
        first = next(per[t] for per in results.values() if t in per)
        names = [m for m in first.metrics if not m.endswith("_stderr")]
        for m in names:
            chance = f"{RANDOM_BASELINE[t]:.2f}" if m == first.primary else ""
            cells = [_cell(per[t], m) if t in per else "-" for per in results.values()]
            lines.append(f"| {t} | {m} | {first.n} | {first.shots} | {chance} | " + " | ".join(cells) + " |")
    cores = [f"{core_score(per):.4f}" for per in results.values()]
    lines.append("| **CORE** | centered mean | | | 0.00 | " + " | ".join(cores) + " |")
    speeds = [
        f"{sum(r.n for r in per.values()) / max(sum(r.seconds for r in per.values()), 1e-9):.1f}"
        for per in results.values()
    ]
    lines.append("| items/s | | | | | " + " | ".join(speeds) + " |")
    return "\n".join(lines)


def to_json(results: dict[str, dict[str, TaskResult]], config: dict) -> dict:
    return {
        "config": config,
        "models": {
            model: {
                "core": core_score(per),
                "tasks": {
                    t: {
                        "n": r.n,
                        "shots": r.shots,
                        "primary": r.primary,
                        "random_baseline": RANDOM_BASELINE[t],
                        "metrics": r.metrics,
                        "seconds": r.seconds,
                        "items_per_s": r.items_per_s,
                        "subtasks": r.subtasks,
                        "items": r.items,
                    }
                    for t, r in per.items()
                },
            }
            for model, per in results.items()
        },
    }


def write_json(path: str | Path, results: dict[str, dict[str, TaskResult]], config: dict) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_json(results, config), indent=1))
    tmp.replace(path)


def bar_chart(path: str | Path, results: dict[str, dict[str, TaskResult]]) -> None:
    """Grouped bars: each task's primary accuracy per model, chance as a tick per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    tasks = list(dict.fromkeys(t for per in results.values() for t in per))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) + 2), 4.2))
    for k, model in enumerate(models):
        per = results[model]
        xs = [i + (k - (len(models) - 1) / 2) * width for i, t in enumerate(tasks) if t in per]
        ys = [per[t].metrics[per[t].primary] for t in tasks if t in per]
        errs = [per[t].metrics.get(per[t].primary + "_stderr", 0.0) for t in tasks if t in per]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=f"{model} (CORE {core_score(per):.3f})")
    for i, t in enumerate(tasks):
        ax.hlines(RANDOM_BASELINE[t], i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy (dashed: chance)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
