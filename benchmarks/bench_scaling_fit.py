"""Scaling-law fit speed: qkv's pruned start grid beside the papers' full 4,500-start protocol.

Synthetic runs from Hoffmann et al.'s law (8 x 8 grid of N and D, 0.1% noise) are fitted with
L-BFGS-B from the best k grid points (k = 8, 32) and, with --full, from all 4,500 starts (what
Hoffmann et al. and Epoch AI did). Printed side by side from one process: seconds, the
objective reached, the recovered parameters, and the speed-up. Also: seconds per bootstrap
refit, and 8 L-BFGS-B runs with BLAS limited to 1 thread (what fit.py does) vs the BLAS
default, side by side (on a busy machine the default's threads spin).

    python benchmarks/bench_scaling_fit.py [--full]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qkv.scaling.fit import ScalingLaw, fit_approach3

HOFFMANN = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="also run all 4,500 starts (minutes)")
    ap.add_argument("--boot", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    N, D = (x.ravel() for x in np.meshgrid(np.logspace(7, 10.5, 8), np.logspace(9, 12.5, 8)))
    L = HOFFMANN.loss(N, D) * np.exp(rng.normal(0, 1e-3, N.shape))
    fit_approach3(N, D, L, n_starts=1)  # warm-up: imports and first-call costs are not fit time
    rows = []
    for k in [8, 32] + ([None] if args.full else []):
        t = time.perf_counter()
        r = fit_approach3(N, D, L, n_starts=k)
        rows.append((k or 4500, time.perf_counter() - t, r))
    from qkv.scaling.fit import _bootstrap, _theta_from_law

    theta = _theta_from_law(rows[1][2].law)
    t = time.perf_counter()
    _bootstrap(theta, np.log(N), np.log(D), np.log(L), 1e-3, args.boot, 4, 0, 0.95)
    boot = (time.perf_counter() - t) / args.boot
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    from qkv.scaling.fit import _grid_objective, _minimise_from, grid_starts

    lg = (np.log(N), np.log(D), np.log(L), 1e-3)
    g = grid_starts()
    top8 = g[np.argsort(_grid_objective(g, *lg))[:8]]
    t = time.perf_counter()
    with threadpool_limits(limits=1):
        _minimise_from(minimize, top8, *lg)
    one = time.perf_counter() - t
    t = time.perf_counter()
    _minimise_from(minimize, top8, *lg)
    default = time.perf_counter() - t
    ref = rows[-1][1]
    print(
        f"{'starts':>6} {'seconds':>8} {'vs slowest':>10} {'objective':>12} "
        f"{'E':>7} {'A':>7} {'B':>7} {'alpha':>7} {'beta':>7}"
    )
    for k, s, r in rows:
        w = r.law
        print(
            f"{k:6d} {s:8.2f} {ref / s:9.1f}x {r.objective:12.6e} "
            f"{w.E:7.4f} {w.A:7.1f} {w.B:7.1f} {w.alpha:7.4f} {w.beta:7.4f}"
        )
    print(f"bootstrap: {boot:.3f} s per refit ({args.boot} refits, 5 starts each)")
    print(f"8 L-BFGS-B runs: BLAS 1 thread {one:.2f} s, BLAS default threads {default:.2f} s ({default / one:.1f}x)")


if __name__ == "__main__":
    main()
