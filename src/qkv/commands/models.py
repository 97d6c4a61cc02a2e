"""List the models known by name (for --model NAME): size, format, path and whether installed.

A name works wherever a model path does (`qkv generate --model smollm2`). A model that is not
installed shows the pip command that installs it.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def describe() -> list[dict]:
    """One row per registered model: name, description, installed, format, size and path
    (or the install command)."""
    from qkv.commands.info import human_bytes
    from qkv.interop.registry import MODELS

    rows = []
    for entry in MODELS.values():
        path = entry.path()
        row = {"name": entry.name, "description": entry.description, "installed": path is not None}
        if path is None:
            row.update(format=entry.suffix.removeprefix("."), size=None, path=None, install=entry.install)
        else:
            size = path.stat().st_size
            row.update(format=entry.suffix.removeprefix("."), size_bytes=size, size=human_bytes(size), path=str(path))
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    import json

    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        if r["installed"]:
            print(f"{r['name']:<{width}}  {r['format']:<5} {r['size']:>10}  {r['path']}")
        else:
            print(f"{r['name']:<{width}}  {r['format']:<5} {'-':>10}  not installed: {r['install']}")
        print(f"{'':<{width}}  {r['description']}")
    return 0
