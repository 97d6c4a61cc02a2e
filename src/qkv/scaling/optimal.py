"""The compute-optimal calculator: how to split a FLOP budget C = 6 N D between parameters and
tokens under a scaling law, either one's own fit (a `qkv scale fit` fit.json) or the default.

The default is Epoch AI's refit of Hoffmann et al.'s Approach 3 (Besiroglu et al., 2024): its
allocation (about 20 tokens per parameter) agrees with Hoffmann et al.'s Approaches 1 and 2,
which the published Approach 3 numbers do not. Every command that answers "how big a model for this
budget" (`qkv scale optimal`, `qkv inspect calc`) goes through `compute_optimal` here.
"""

from __future__ import annotations

import json
from pathlib import Path

from qkv.scaling.fit import Allocation, ScalingLaw, optimal_allocation

DEFAULT_LAW = ScalingLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
DEFAULT_LAW_SOURCE = "Epoch AI's refit of Hoffmann et al.'s Approach 3 (Besiroglu et al., 2024)"
LAW_KEYS = ("E", "A", "B", "alpha", "beta")


def compute_optimal(compute: float, law: ScalingLaw | None = None) -> Allocation:
    """Compute-optimal N and D for a FLOP budget under `law` (default: DEFAULT_LAW)."""
    return optimal_allocation(DEFAULT_LAW if law is None else law, compute)


def load_law(path: str | Path, n_column: str | None = None) -> ScalingLaw:
    """The law in a `qkv scale fit` fit.json ({"fits": {COLUMN: {"law": ...}}}) or in a bare JSON
    {E, A, B, alpha, beta}. `n_column` picks the fit; None takes "N" when present, else the first."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such fit file (make one with `qkv scale fit`)")
    d = json.loads(path.read_text())
    if "fits" in d:
        fits = d["fits"]
        if not fits:
            raise ValueError(f"{path}: the fit file holds no fits; rerun `qkv scale fit` on more runs")
        column = n_column or ("N" if "N" in fits else next(iter(fits)))
        if column not in fits:
            raise ValueError(f"{path} has no fit for {column!r}; it has {sorted(fits)}")
        d = fits[column]
    law = d.get("law", d)
    missing = set(LAW_KEYS) - set(law)
    if missing:
        raise ValueError(
            f"{path}: the law lacks {sorted(missing)}; give a `qkv scale fit` fit.json or {{E, A, B, alpha, beta}}"
        )
    return ScalingLaw(**{k: float(law[k]) for k in LAW_KEYS})
