"""Scaling-law figures (PNG): loss vs N per D, IsoFLOP curves with their minima, the fitted
compute-optimal frontier, and the fit's residuals."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from qkv.io import atomic_write_bytes
from qkv.scaling.fit import Approach2Result, FitResult, group_budgets, optimal_allocation


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def loss_vs_n(N, D, L, fit: FitResult | None, path, n_label: str = "N (parameters)") -> Path:
    """Runs coloured by tokens D; fitted L(N, D) drawn at a few D values."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sc = ax.scatter(N, L, c=np.log10(D), cmap="viridis", s=28, zorder=3)
    fig.colorbar(sc, ax=ax, label="log10 D (tokens)")
    if fit is not None:
        ns = np.logspace(np.log10(N.min()) - 0.2, np.log10(N.max()) + 0.2, 100)
        cmap = plt.get_cmap("viridis")
        lo, hi = np.log10(D.min()), np.log10(D.max())
        for d in np.quantile(D, [0.0, 0.5, 1.0]):
            frac = 0.5 if hi == lo else (np.log10(d) - lo) / (hi - lo)
            ax.plot(ns, fit.law.loss(ns, d), color=cmap(frac), lw=1, alpha=0.8, label=f"fit, D={d:.2g}")
        ax.axhline(fit.law.E, color="gray", ls=":", lw=1, label=f"E={fit.law.E:.3g}")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(n_label)
    ax.set_ylabel("final validation loss")
    ax.set_title("Loss vs model size, coloured by training tokens")
    return save(fig, path)


def isoflop(N, L, C, a2: Approach2Result | None, path, n_label: str = "N (parameters)") -> Path:
    """One curve per budget: runs, the fitted parabola in log N, and its minimum."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    labels = group_budgets(np.asarray(C, dtype=float))
    cmap = plt.get_cmap("plasma")
    k = labels.max() + 1
    minima = {round(np.log(m.compute), 6): m for m in (a2.minima if a2 else [])}
    for lab in range(k):
        sel = labels == lab
        c = float(np.exp(np.log(C[sel]).mean()))
        color = cmap(0.85 * lab / max(k - 1, 1))
        order = np.argsort(N[sel])
        ax.plot(N[sel][order], L[sel][order], "o", color=color, label=f"C={c:.2g}")
        m = minima.get(round(np.log(c), 6))
        if m is not None:
            x = np.linspace(np.log(N[sel].min()), np.log(N[sel].max()), 60)
            c0, c1, c2 = m.coeffs
            ax.plot(np.exp(x), c0 + c1 * x + c2 * x * x, "-", color=color, lw=1)
            ax.plot([m.n_opt], [m.loss_opt], "*", color=color, ms=14, mec="k", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel(n_label)
    ax.set_ylabel("final validation loss")
    ax.set_title("IsoFLOP curves (star: parabola minimum)")
    ax.legend(fontsize=8)
    return save(fig, path)


def frontier(fit: FitResult | None, a2: Approach2Result | None, C, path, n_label: str = "N") -> Path:
    """Compute-optimal N*(C) and D*(C): Approach 3's law as lines, Approach 2's minima as points."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    C = np.asarray(C, dtype=float)
    cs = np.logspace(np.log10(C.min()) - 0.5, np.log10(C.max()) + 1.0, 60)
    if fit is not None:
        try:
            allocs = [optimal_allocation(fit.law, c) for c in cs]
            axes[0].plot(cs, [a.n_params for a in allocs], "-", label=f"Approach 3: N* ∝ C^{fit.law.a_exponent:.2f}")
            axes[1].plot(cs, [a.n_tokens for a in allocs], "-", label=f"Approach 3: D* ∝ C^{fit.law.b_exponent:.2f}")
        except ValueError:
            pass  # degenerate law: no allocation to draw
    if a2 is not None:
        mc = np.array([m.compute for m in a2.minima])
        axes[0].plot(mc, [m.n_opt for m in a2.minima], "o", label=f"Approach 2 minima (a={a2.a:.2f})")
        axes[0].plot(cs, a2.n_coef * cs**a2.a, "--", lw=1)
        axes[1].plot(mc, [m.d_opt for m in a2.minima], "o", label=f"Approach 2 minima (b={a2.b:.2f})")
        axes[1].plot(cs, a2.d_coef * cs**a2.b, "--", lw=1)
    for ax, what in zip(axes, (f"optimal {n_label}", "optimal D (tokens)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C = 6ND (FLOPs)")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    fig.suptitle("Compute-optimal frontier")
    return save(fig, path)


def residuals(fit: FitResult, N, D, L, path, n_label: str = "N (parameters)") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    r = fit.residuals(N, D, L)
    sc = ax.scatter(N, r, c=np.log10(D), cmap="viridis", s=28)
    fig.colorbar(sc, ax=ax, label="log10 D (tokens)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(n_label)
    ax.set_ylabel("log L̂ − log L")
    ax.set_title(f"Residuals of the Approach 3 fit (RMS {np.sqrt(np.mean(r**2)):.2e})")
    return save(fig, path)
