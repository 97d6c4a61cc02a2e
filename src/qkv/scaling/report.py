"""Fit a runs table both ways (with and without embedding parameters) and write the result:
fit.json, the four PNG figures per count, and a Markdown summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from qkv.io import atomic_write_text
from qkv.scaling import plots
from qkv.scaling.fit import fit_approach2, fit_approach3, optimal_allocation
from qkv.scaling.runs import load_runs, read_rows

COUNTS = {"N": "with embeddings", "N_nonembed": "without embeddings"}


def fit_table(
    source,
    out_dir,
    *,
    n_columns: list[str] | None = None,
    where: dict | None = None,
    n_boot: int = 100,
    n_starts: int | None = 32,
    prefix: str = "scaling_",
    budgets: tuple[float, ...] = (),
    json_path=None,
    log=print,
) -> dict:
    """Fit every requested parameter count; returns a JSON-able summary, also written to
    json_path (default out_dir/fit.json; `qkv scale optimal --fit` reads it). Figures go in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = list(read_rows(source)[0].keys())
    if n_columns is None:
        n_columns = [c for c in COUNTS if c in header] or [None]
    summary = {"source": str(source), "filter": where or {}, "fits": {}}
    for col in n_columns:
        runs = load_runs(source, n_column=col, where=where)
        name = runs.n_column
        label = f"{name} ({COUNTS.get(name, 'parameters')})"
        t0 = time.perf_counter()
        fit = fit_approach3(runs.N, runs.D, runs.loss, n_starts=n_starts, n_boot=n_boot)
        t_fit = time.perf_counter() - t0
        entry = {
            "n_column": name,
            "n_points": fit.n_points,
            "law": fit.law.to_dict(),
            "objective": fit.objective,
            "n_starts": fit.n_starts,
            "converged": fit.converged,
            "n_boot": fit.n_boot,
            "ci95": fit.ci,
            "a": fit.law.a_exponent,
            "b": fit.law.b_exponent,
            "seconds": t_fit,
            "rms_residual": float(np.sqrt(np.mean(fit.residuals(runs.N, runs.D, runs.loss) ** 2))),
        }
        try:
            a2 = fit_approach2(runs.N, runs.loss, runs.C)
            entry["approach2"] = {
                "a": a2.a,
                "b": a2.b,
                "skipped": a2.skipped,
                "minima": [
                    {
                        "C": m.compute,
                        "N_opt": m.n_opt,
                        "D_opt": m.d_opt,
                        "loss": m.loss_opt,
                        "tokens_per_param": m.d_opt / m.n_opt,
                    }
                    for m in a2.minima
                ],
            }
        except ValueError as e:
            a2 = None
            entry["approach2"] = {"error": str(e)}
        allocs = {}
        for c in sorted(set(budgets) or {float(np.exp(np.log(runs.C).mean()))}):
            try:
                al = optimal_allocation(fit.law, c)
                allocs[f"{c:.3g}"] = {
                    "N": al.n_params,
                    "D": al.n_tokens,
                    "tokens_per_param": al.tokens_per_param,
                    "loss": al.loss,
                }
            except ValueError as e:
                allocs[f"{c:.3g}"] = {"error": str(e)}
        entry["allocation"] = allocs
        tag = "" if name == "N" else f"_{name}"
        entry["figures"] = [
            str(plots.loss_vs_n(runs.N, runs.D, runs.loss, fit, out_dir / f"{prefix}loss_vs_n{tag}.png", label).name),
            str(plots.isoflop(runs.N, runs.loss, runs.C, a2, out_dir / f"{prefix}isoflop{tag}.png", label).name),
            str(plots.frontier(fit, a2, runs.C, out_dir / f"{prefix}frontier{tag}.png", name).name),
            str(plots.residuals(fit, runs.N, runs.D, runs.loss, out_dir / f"{prefix}residuals{tag}.png", label).name),
        ]
        summary["fits"][name] = entry
        log(
            f"{label}: E={fit.law.E:.4g} A={fit.law.A:.4g} B={fit.law.B:.4g} alpha={fit.law.alpha:.4g} "
            f"beta={fit.law.beta:.4g} (a={fit.law.a_exponent:.3f}, b={fit.law.b_exponent:.3f}); "
            f"{fit.n_points} runs, {t_fit:.1f}s incl. {n_boot} bootstrap refits"
        )
    atomic_write_text(Path(json_path) if json_path else out_dir / "fit.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _ci(entry: dict, key: str) -> str:
    ci = entry.get("ci95", {}).get(key)
    return f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""


def markdown(summary: dict, figure_dir: str = "") -> str:
    """The fit summary as Markdown: the two counts side by side, then the figures."""
    fits = summary["fits"]
    cols = list(fits)
    head = "| | " + " | ".join(f"{c} ({COUNTS.get(c, 'parameters')})" for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(fits[c]) for c in cols) + " |")

    for key in ("E", "A", "B", "alpha", "beta"):
        row(key, lambda e, k=key: f"{e['law'][k]:.4g}{_ci(e, k)}")
    row("a = β/(α+β) (N* ∝ C^a)", lambda e: f"{e['a']:.3f}{_ci(e, 'a')}")
    row("b = α/(α+β) (D* ∝ C^b)", lambda e: f"{e['b']:.3f}{_ci(e, 'b')}")
    row(
        "Approach 2: a, b",
        lambda e: f"{e['approach2']['a']:.3f}, {e['approach2']['b']:.3f}" if "a" in e["approach2"] else "n/a",
    )
    row("RMS residual (log L)", lambda e: f"{e['rms_residual']:.2e}")
    row("runs; fit seconds", lambda e: f"{e['n_points']}; {e['seconds']:.1f}")
    budgets = list(next(iter(fits.values()))["allocation"])
    for c in budgets:
        row(
            f"C={c}: N*, D*, tokens/param",
            lambda e, c=c: (
                (
                    f"{e['allocation'][c]['N']:.3g}, {e['allocation'][c]['D']:.3g}, "
                    f"{e['allocation'][c]['tokens_per_param']:.1f}"
                )
                if "N" in e["allocation"].get(c, {})
                else "n/a"
            ),
        )
    for c in cols:
        a2 = fits[c]["approach2"]
        if "error" in a2:
            lines += ["", f"Approach 2 ({c}): {a2['error']}."]
        if "minima" in a2:
            lines.append("")
            lines.append(
                f"IsoFLOP minima ({c}): "
                + "; ".join(
                    f"C={m['C']:.2g}: N_opt={m['N_opt']:.3g}, D_opt={m['D_opt']:.3g} "
                    f"({m['tokens_per_param']:.1f} tokens/param)"
                    for m in a2["minima"]
                )
                + "."
            )
            if a2.get("skipped"):
                lines.append(f"Budgets without a bracketed minimum: {'; '.join(a2['skipped'])}.")
    lines.append("")
    for c in cols:
        for f in fits[c]["figures"]:
            lines.append(f"![{f}]({figure_dir}{f})")
    return "\n".join(lines) + "\n"
