"""Embeddings: nearest neighbours, analogy arithmetic, a 2-D PCA map, and how each position
scheme's similarity falls off with distance.

Token vectors are rows of the input embedding table. Similarity is cosine. The analogy
a − b + c ("king − man + woman") is 3CosAdd over unit vectors (Mikolov et al. 2013),
excluding the three query words from the answers, as is standard.

Position schemes (see qkv/model/positions.py):
- sinusoidal and learned add a vector per position; we plot the mean cosine between the
  encodings of positions p and p + offset.
- RoPE rotates queries and keys; the score of a vector with itself rotated by an offset
  o is proportional to mean_i cos(o * inv_freq_i) — the quantity plotted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def embedding_matrix(model) -> torch.Tensor:
    return model.tok_emb.weight.detach().float().cpu()


def word_id(tokenizer, word: str) -> int:
    """The id of a word that is exactly one token; a clear error otherwise."""
    if tokenizer is None:
        raise ValueError(
            "this model has no tokenizer, so words cannot be looked up; use a checkpoint with tokenizer files"
        )
    if not word:
        raise ValueError("empty word; give a word such as ' king' (a leading space matters for BPE vocabularies)")
    ids = tokenizer.encode(word)
    if len(ids) == 1:
        return ids[0]
    pieces = [tokenizer.decode([i]) for i in ids]
    alt = word[1:] if word.startswith(" ") else " " + word
    alt_ids = tokenizer.encode(alt)
    hint = f"; {alt!r} is a single token, try that" if len(alt_ids) == 1 else "; choose a word that is a single token"
    raise ValueError(f"{word!r} is not in the vocabulary as one token: it splits into {len(ids)} tokens {pieces}{hint}")


def _normed(E: torch.Tensor) -> torch.Tensor:
    return F.normalize(E, dim=-1)


def nearest(E: torch.Tensor, vec: torch.Tensor, k: int, exclude: Sequence[int] = ()) -> list[tuple[int, float]]:
    """Top-k rows of E by cosine with vec, leaving out `exclude`."""
    sims = _normed(E) @ F.normalize(vec, dim=-1)
    if exclude:
        sims[list(exclude)] = -float("inf")
    scores, ids = sims.topk(k)
    return [(int(i), float(s)) for i, s in zip(ids, scores)]


def neighbours(model, tokenizer, word: str, k: int = 10) -> list[dict]:
    """Nearest tokens to `word` by cosine of input embeddings (the word itself excluded)."""
    E = embedding_matrix(model)
    i = word_id(tokenizer, word)
    return [
        {"token": tokenizer.decode([j]), "id": j, "score": round(s, 4)} for j, s in nearest(E, E[i], k, exclude=[i])
    ]


def analogy(model, tokenizer, a: str, b: str, c: str, k: int = 5) -> list[dict]:
    """Tokens closest to unit(a) − unit(b) + unit(c) (a − b + c), query words excluded."""
    E = embedding_matrix(model)
    ia, ib, ic = (word_id(tokenizer, w) for w in (a, b, c))
    U = _normed(E)
    vec = U[ia] - U[ib] + U[ic]
    return [
        {"token": tokenizer.decode([j]), "id": j, "score": round(s, 4)}
        for j, s in nearest(E, vec, k, exclude=[ia, ib, ic])
    ]


def pca_2d(vectors: torch.Tensor) -> torch.Tensor:
    """(n, 2) projection on the top two principal components."""
    X = vectors.float() - vectors.float().mean(0, keepdim=True)
    _, _, V = torch.linalg.svd(X, full_matrices=False)
    return X @ V[:2].T


def plot_pca(model, tokenizer, words: Sequence[str], path, title: str = "") -> list[dict]:
    """Scatter of the chosen single-token words on the top-2 principal components."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(words) < 3:
        raise ValueError("give at least 3 words for a PCA plot")
    E = embedding_matrix(model)
    ids = [word_id(tokenizer, w) for w in words]
    xy = pca_2d(E[ids])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(xy[:, 0], xy[:, 1], s=12)
    for (x, y), w in zip(xy.tolist(), words):
        ax.annotate(w.strip() or repr(w), (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "token embeddings, first two principal components", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [{"word": w, "id": i, "x": round(p[0], 4), "y": round(p[1], 4)} for w, i, p in zip(words, ids, xy.tolist())]


# --- positions -----------------------------------------------------------------------


def _mean_offset_cosine(table: torch.Tensor, max_offset: int) -> list[float]:
    U = _normed(table.float())
    n = U.shape[0]
    return [float((U[: n - o] * U[o:]).sum(-1).mean()) for o in range(min(max_offset, n - 1) + 1)]


def position_similarity(
    model=None, cfg=None, max_offset: int = 128, d_model: int | None = None
) -> dict[str, list[float]]:
    """Similarity vs offset for the schemes that apply.

    Always: sinusoidal (at the model's d_model) and RoPE (at its head_dim and theta).
    With a model that has learned positions: its learned table too.
    """
    from qkv.model.positions import rope_inv_freq, sinusoidal_table

    cfg = cfg if cfg is not None else model.cfg
    d = d_model or cfg.d_model
    n = max(cfg.max_seq_len, max_offset + 1)
    out = {"sinusoidal": _mean_offset_cosine(sinusoidal_table(min(n, 4 * max_offset + 1), d), max_offset)}
    inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).double()
    offs = torch.arange(max_offset + 1, dtype=torch.float64)
    out["rope"] = [float(x) for x in torch.cos(offs[:, None] * inv[None]).mean(-1)]
    if model is not None and cfg.pos == "learned":
        out["learned"] = _mean_offset_cosine(model.pos_emb.weight.detach(), max_offset)
    return out


def plot_position_similarity(sims: dict[str, list[float]], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, ys in sims.items():
        ax.plot(range(len(ys)), ys, label=name, lw=1.2)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("offset between positions")
    ax.set_ylabel("cosine similarity")
    ax.legend(fontsize=8)
    ax.set_title(title or "position encodings: similarity vs offset", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
