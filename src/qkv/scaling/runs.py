"""Runs tables: the CSV a sweep writes and `qkv scale fit` reads.

One row per finished training run. The columns a fit needs are N (parameters), D (training
tokens) and the final validation loss; a compute budget column groups runs into IsoFLOP
curves (without one, C = 6·N·D is used and budgets within 2% are grouped). Common spellings
are accepted so a table from elsewhere fits too:

    N:     N, n_params, params, parameters
    D:     D, tokens, n_tokens, data
    loss:  val_loss, loss, L
    C:     budget, C, compute, flops          (optional)

A sweep's table carries both counts side by side: N / N_nonembed (what one token activates,
with and without embeddings, the FLOP-relevant counts; Kaplan et al. fitted non-embedding
parameters, Hoffmann et al. all of them) and N_total / N_total_nonembed (all weights, the
memory-relevant counts, larger for MoE).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkv.io import atomic_write_text

ALIASES = {
    "N": ("N", "n_params", "params", "parameters"),
    "D": ("D", "tokens", "n_tokens", "data"),
    "loss": ("val_loss", "loss", "L"),
    "C": ("budget", "C", "compute", "flops"),
}
RUNS_CSV = "runs.csv"


@dataclass
class Runs:
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    C: np.ndarray  # the budget each run belongs to
    rows: list[dict]
    source: str
    n_column: str


def resolve_path(path: str | Path) -> Path:
    """A CSV file, or a sweep directory holding runs.csv."""
    path = Path(path)
    if path.is_dir():
        path = path / RUNS_CSV
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such runs table (give a CSV file or a sweep directory with {RUNS_CSV})")
    return path


def read_rows(path: str | Path) -> list[dict]:
    path = resolve_path(path)
    text = path.read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise ValueError(f"{path}: the table has no runs (a header and one row per run are needed)")
    return rows


def _column(header: list[str], key: str, explicit: str | None, path: Path, required: bool = True) -> str | None:
    if explicit:
        if explicit not in header:
            raise ValueError(f"{path}: no column {explicit!r}; columns are {header}")
        return explicit
    for name in ALIASES[key]:
        if name in header:
            return name
    if required:
        raise ValueError(f"{path}: no {key} column (one of {list(ALIASES[key])}); columns are {header}")
    return None


def _float(value: str, column: str, row: int, path: Path) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: row {row}: {column}={value!r} is not a number") from None


def load_runs(path: str | Path, n_column: str | None = None, where: dict | None = None) -> Runs:
    """Read a runs table. n_column picks the parameter count (e.g. N_nonembed); `where`
    keeps rows whose columns equal the given values (e.g. {"kind": "dense"})."""
    path = resolve_path(path)
    rows = read_rows(path)
    if where:
        rows = [r for r in rows if all(str(r.get(k)) == str(v) for k, v in where.items())]
        if not rows:
            raise ValueError(f"{path}: no runs match {where}")
    header = list(rows[0].keys())
    cn = _column(header, "N", n_column, path)
    cd = _column(header, "D", None, path)
    cl = _column(header, "loss", None, path)
    cc = _column(header, "C", None, path, required=False)
    N = np.array([_float(r[cn], cn, i, path) for i, r in enumerate(rows, 1)])
    D = np.array([_float(r[cd], cd, i, path) for i, r in enumerate(rows, 1)])
    L = np.array([_float(r[cl], cl, i, path) for i, r in enumerate(rows, 1)])
    C = np.array([_float(r[cc], cc, i, path) for i, r in enumerate(rows, 1)]) if cc else 6 * N * D
    return Runs(N=N, D=D, loss=L, C=C, rows=rows, source=str(path), n_column=cn)


def write_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    """The whole table, atomically (a killed sweep never leaves a half-written row)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k, "")) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _fmt(v):
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v
