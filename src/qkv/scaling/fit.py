"""Scaling-law fits: Chinchilla's Approach 3 (parametric law) and Approach 2 (IsoFLOP parabolas),
and the compute-optimal allocation they imply.

Approach 3 (Hoffmann et al. 2022, as replicated by Epoch AI, Besiroglu et al. 2024):

    L(N, D) = E + A / N^α + B / D^β

is fitted in log space. With a = log A, b = log B, e = log E the model's log-loss is

    log L̂ = LSE(a − α log N,  b − β log D,  e)          (LSE = log-sum-exp)

and we minimise the SUM over runs of Huber_δ(log L̂ − log L), δ = 1e-3, with L-BFGS-B,
starting from a grid: α, β ∈ {0, 0.5, …, 2}; e ∈ {−1, −0.5, …, 1}; a, b ∈ {0, 5, …, 25}
(4,500 starts). The objective is evaluated on the whole grid at once with numpy; L-BFGS-B
(with the analytic gradient) then runs from the `n_starts` best grid points, and the best
optimum wins. `n_starts=None` runs from all 4,500, exactly as the papers did; on every
data set we tried, the best 32 reach the same optimum and take a fraction of the time.

Tolerances matter: the summed Huber loss of a good fit is tiny (~1e-6), and scipy's default
relative tolerance (ftol ≈ 2e-9, measured against max(|f|, 1)) would stop L-BFGS-B almost at
once. Epoch traced part of the gap between their refit and Hoffmann's numbers to exactly
this, so we tighten ftol/gtol.

Threads: each objective is a few microseconds of work on ~100 numbers, and a multi-threaded
BLAS inside L-BFGS-B only spins: on a busy 2-core machine one fit went from 0.6 s to 13 s.
The fits therefore run with BLAS limited to one thread (threadpoolctl).

Bootstrap: refit on runs resampled with replacement; percentile intervals.

Approach 2: for each compute budget C, fit a parabola to loss against log N over that
budget's runs; its vertex is N_opt(C), and D_opt = C / (6 N_opt). Straight lines through
(log C, log N_opt) and (log C, log D_opt) give N_opt ∝ C^a and D_opt ∝ C^b (a + b = 1).

Allocation: minimising L subject to C = 6 N D gives
    N* = G (C/6)^{β/(α+β)},   D* = G⁻¹ (C/6)^{α/(α+β)},   G = (αA / (βB))^{1/(α+β)}.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

HUBER_DELTA = 1e-3
N_LAW_PARAMS = 5  # E, A, B, alpha, beta

# Hoffmann et al.'s grid of starting points (a, b, e, alpha, beta order below)
GRID_ALPHA = np.arange(0.0, 2.0 + 1e-9, 0.5)
GRID_BETA = np.arange(0.0, 2.0 + 1e-9, 0.5)
GRID_E = np.arange(-1.0, 1.0 + 1e-9, 0.5)
GRID_A = np.arange(0.0, 25.0 + 1e-9, 5.0)
GRID_B = np.arange(0.0, 25.0 + 1e-9, 5.0)


# --- the law and its allocation ------------------------------------------------------------


@dataclass
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def a_exponent(self) -> float:
        """N* ∝ C^a with a = β / (α + β)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b_exponent(self) -> float:
        """D* ∝ C^b with b = α / (α + β)."""
        return self.alpha / (self.alpha + self.beta)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Allocation:
    compute: float
    n_params: float
    n_tokens: float
    loss: float

    @property
    def tokens_per_param(self) -> float:
        return self.n_tokens / self.n_params


def optimal_allocation(law: ScalingLaw, compute: float) -> Allocation:
    """Compute-optimal N and D for a FLOP budget C = 6 N D (Hoffmann et al., Appendix A)."""
    if not (compute > 0 and math.isfinite(compute)):
        raise ValueError(f"compute budget must be a positive number of FLOPs, got {compute!r}")
    if law.alpha <= 0 or law.beta <= 0 or law.A <= 0 or law.B <= 0:
        raise ValueError(
            f"allocation needs positive A, B, alpha, beta; got {law.to_dict()} "
            "(the fit is degenerate: add runs that vary both N and D)"
        )
    n = law.G * (compute / 6.0) ** law.a_exponent
    d = compute / (6.0 * n)
    return Allocation(compute=compute, n_params=n, n_tokens=d, loss=float(law.loss(n, d)))


# --- input checks -------------------------------------------------------------------------


def check_points(N, D, L, min_points: int = N_LAW_PARAMS + 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays of equal length, finite, positive and at least `min_points` long, or a clear error."""
    N, D, L = (np.asarray(x, dtype=float).reshape(-1) for x in (N, D, L))
    if not (len(N) == len(D) == len(L)):
        raise ValueError(f"N, D and loss must have the same length, got {len(N)}, {len(D)}, {len(L)}")
    for name, x in (("N (parameters)", N), ("D (tokens)", D), ("loss", L)):
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise ValueError(
                f"{name} is NaN or infinite in row(s) {bad[:10].tolist()}: a diverged or unfinished run? "
                "drop or rerun those runs before fitting"
            )
        bad = np.flatnonzero(x <= 0)
        if bad.size:
            raise ValueError(
                f"{name} must be positive, got {x[bad[:5]].tolist()} in row(s) {bad[:10].tolist()}; "
                "fix or drop those rows"
            )
    if len(N) < min_points:
        raise ValueError(
            f"{len(N)} runs cannot determine the {N_LAW_PARAMS} parameters of L = E + A/N^α + B/D^β "
            f"(need at least {min_points}); add runs at more model sizes and token counts"
        )
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise ValueError("the runs must vary both N and D (at least two distinct values of each) to fit the law")
    return N, D, L


# --- Approach 3 ---------------------------------------------------------------------------


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray, delta: float):
    """Sum of Huber losses and its gradient. theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    z = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    zmax = z.max(axis=0)
    ez = np.exp(z - zmax)
    s = ez.sum(axis=0)
    pred = zmax + np.log(s)
    w = ez / s  # softmax weights: d pred / d z_k
    r = pred - logL
    g = np.clip(r, -delta, delta)  # Huber'
    grad = np.array(
        [
            (g * w[0]).sum(),
            (g * w[1]).sum(),
            (g * w[2]).sum(),
            -(g * w[0] * logN).sum(),
            -(g * w[1] * logD).sum(),
        ]
    )
    return float(_huber(r, delta).sum()), grad


def grid_starts() -> np.ndarray:
    """All 4,500 starting points, rows (a, b, e, alpha, beta)."""
    return np.array(list(itertools.product(GRID_A, GRID_B, GRID_E, GRID_ALPHA, GRID_BETA)), dtype=float)


def _grid_objective(starts: np.ndarray, logN, logD, logL, delta: float) -> np.ndarray:
    """The objective at every start at once: (S,)."""
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    z = np.stack(np.broadcast_arrays(a - alpha * logN, b - beta * logD, e + 0 * logN))  # (3, S, n)
    pred = np.logaddexp.reduce(z, axis=0)
    return _huber(pred - logL, delta).sum(axis=1)


@dataclass
class FitResult:
    law: ScalingLaw
    objective: float
    n_points: int
    n_starts: int
    converged: bool
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95% bootstrap intervals
    n_boot: int = 0

    def residuals(self, N, D, L) -> np.ndarray:
        """log L̂ − log L per run."""
        return np.log(self.law.loss(N, D)) - np.log(np.asarray(L, dtype=float))


MAX_LOG_PARAM = 700.0  # math.exp overflows float64 just above 709


def _minimise(starts: np.ndarray, logN, logD, logL, delta: float):
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _minimise_from(minimize, starts, logN, logD, logL, delta)


def _minimise_from(minimize, starts, logN, logD, logL, delta):
    best = None
    for x0 in starts:
        res = minimize(
            _objective,
            x0,
            args=(logN, logD, logL, delta),
            jac=True,
            method="L-BFGS-B",
            options=dict(maxiter=1000, ftol=1e-15, gtol=1e-12, maxcor=20),
        )
        # a, b, e are logs of A, B, E: an optimum beyond exp's range (a degenerate term with
        # A -> inf, alpha -> inf, seen on bootstrap resamples of small sweeps) is not a law
        representable = np.all(np.isfinite(res.x)) and np.all(res.x[:3] < MAX_LOG_PARAM)
        if representable and (best is None or res.fun < best.fun):
            best = res
    return best


def _law_from_theta(theta: np.ndarray) -> ScalingLaw:
    a, b, e, alpha, beta = (float(t) for t in theta)
    return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def _theta_from_law(law: ScalingLaw) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


def fit_approach3(
    N: Sequence[float],
    D: Sequence[float],
    L: Sequence[float],
    *,
    delta: float = HUBER_DELTA,
    n_starts: int | None = 32,
    n_boot: int = 0,
    boot_starts: int = 4,
    seed: int = 0,
    ci_level: float = 0.95,
) -> FitResult:
    """Fit L = E + A/N^α + B/D^β (Chinchilla Approach 3). See the module docstring.

    n_starts: L-BFGS-B runs from this many best grid points (None: all 4,500).
    n_boot: bootstrap refits for confidence intervals (0: none). Each refit starts from the
    full-data optimum and the `boot_starts` best grid points for its own resample.
    """
    N, D, L = check_points(N, D, L)
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    starts = grid_starts()
    if n_starts is not None and n_starts < len(starts):
        values = _grid_objective(starts, logN, logD, logL, delta)
        starts = starts[np.argsort(values, kind="stable")[: max(1, n_starts)]]
    best = _minimise(starts, logN, logD, logL, delta)
    if best is None:
        raise RuntimeError("the scaling-law fit failed from every start (non-finite optimum); check the data")
    result = FitResult(
        law=_law_from_theta(best.x),
        objective=float(best.fun),
        n_points=len(N),
        n_starts=len(starts),
        converged=bool(best.success),
    )
    if n_boot > 0:
        result.ci = _bootstrap(best.x, logN, logD, logL, delta, n_boot, boot_starts, seed, ci_level)
        result.n_boot = n_boot
    return result


def _bootstrap(theta, logN, logD, logL, delta, n_boot, boot_starts, seed, level) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    grid = grid_starts()
    n = len(logN)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        if len(np.unique(idx)) < N_LAW_PARAMS:
            continue
        ln, ld, ll = logN[idx], logD[idx], logL[idx]
        top = grid[np.argsort(_grid_objective(grid, ln, ld, ll, delta), kind="stable")[:boot_starts]]
        res = _minimise(np.vstack([theta, top]), ln, ld, ll, delta)
        if res is not None:
            law = _law_from_theta(res.x)
            samples.append([law.E, law.A, law.B, law.alpha, law.beta, law.a_exponent, law.b_exponent])
    if not samples:
        return {}
    s = np.array(samples)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    names = ["E", "A", "B", "alpha", "beta", "a", "b"]
    return {k: (float(np.percentile(s[:, i], lo)), float(np.percentile(s[:, i], hi))) for i, k in enumerate(names)}


# --- Approach 2 ---------------------------------------------------------------------------


@dataclass
class IsoFLOPMinimum:
    compute: float
    n_opt: float
    d_opt: float
    loss_opt: float
    coeffs: tuple[float, float, float]  # loss = c0 + c1 x + c2 x², x = log N
    n_points: int


@dataclass
class Approach2Result:
    minima: list[IsoFLOPMinimum]
    a: float  # N_opt ∝ C^a
    b: float  # D_opt ∝ C^b
    n_coef: float  # N_opt = n_coef · C^a
    d_coef: float
    skipped: list[str] = field(default_factory=list)  # budgets without a usable parabola, and why


def group_budgets(C: np.ndarray, rel_tol: float = 0.02) -> np.ndarray:
    """Label runs whose budgets agree within rel_tol (6ND rarely hits a nominal budget exactly)."""
    order = np.argsort(C)
    labels = np.empty(len(C), dtype=int)
    label, ref = -1, None
    for i in order:
        if ref is None or C[i] > ref * (1 + rel_tol):
            label, ref = label + 1, C[i]
        labels[i] = label
    return labels


def fit_approach2(N: Sequence[float], L: Sequence[float], C: Sequence[float]) -> Approach2Result:
    """Per-budget parabola of loss vs log N; power laws through the vertices.

    C is each run's compute budget (nominal, or 6ND; budgets within 2% are grouped).
    A budget needs ≥ 3 distinct model sizes and an upward-opening parabola whose vertex
    lies within its sizes (otherwise the minimum was not bracketed and is skipped).
    """
    N, L, C = (np.asarray(x, dtype=float).reshape(-1) for x in (N, L, C))
    check_points(N, C, L, min_points=3)
    labels = group_budgets(C)
    minima, skipped = [], []
    for lab in np.unique(labels):
        sel = labels == lab
        c = float(np.exp(np.log(C[sel]).mean()))
        x, y = np.log(N[sel]), L[sel]
        if len(np.unique(x)) < 3:
            skipped.append(f"C={c:.3g}: {len(np.unique(x))} model size(s), need 3")
            continue
        c2, c1, c0 = np.polyfit(x, y, 2)
        if c2 <= 0:
            skipped.append(f"C={c:.3g}: loss is not convex in log N (no minimum)")
            continue
        xv = -c1 / (2 * c2)
        if not (x.min() <= xv <= x.max()):
            skipped.append(f"C={c:.3g}: the minimum (N={math.exp(xv):.3g}) lies outside the sizes tried")
            continue
        n_opt = math.exp(xv)
        minima.append(
            IsoFLOPMinimum(
                compute=c,
                n_opt=n_opt,
                d_opt=c / (6 * n_opt),
                loss_opt=float(c0 + c1 * xv + c2 * xv * xv),
                coeffs=(float(c0), float(c1), float(c2)),
                n_points=int(sel.sum()),
            )
        )
    if len(minima) < 2:
        raise ValueError(
            f"Approach 2 needs minima at two or more compute budgets, found {len(minima)}"
            + (f" ({'; '.join(skipped)})" if skipped else "")
            + "; run more budgets, each with model sizes on both sides of the optimum"
        )
    lc = np.log([m.compute for m in minima])
    a, log_kn = np.polyfit(lc, np.log([m.n_opt for m in minima]), 1)
    b, log_kd = np.polyfit(lc, np.log([m.d_opt for m in minima]), 1)
    return Approach2Result(
        minima=minima, a=float(a), b=float(b), n_coef=math.exp(log_kn), d_coef=math.exp(log_kd), skipped=skipped
    )
