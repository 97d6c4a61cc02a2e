"""Attention inspection: per layer/head maps, entropy, and scores that classify heads.

Every Attention module can keep its probabilities (`keep_probs=True` forces the math
path and stores `last_probs` (B, H, T, S)). `capture_attention` runs one forward with
that switch on and returns the stack (layers, heads, T, S) for a single sequence.

Head classes, each a score in [0, 1] = mean attention mass on one key per query:
- previous-token: query t attends to key t-1.
- induction: on a random token segment repeated twice, query t in the second copy
  attends to the key right after the previous occurrence of its token (t - L + 1).
  This is the "prefix matching" score of Olsson et al. (2022), "In-context learning
  and induction heads". Random tokens make any other explanation (n-gram statistics,
  semantics) useless, so only a head that copies "what came next last time" scores high.
- sink / first-token: query t attends to key 0 (Xiao et al. 2023, "attention sinks").
Entropy (nats, per query, averaged) says how spread out a head is: 0 = one key.

Chance level for the position-specific scores is the mean of 1/(t+1) over the scored
queries (uniform attention over the causal prefix); `chance_level` returns it so a
threshold can be stated relative to it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qkv.model.attention import Attention


def _attention_modules(model) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def shadow(model):
    """A private copy of the module tree that shares every parameter and buffer (no weight
    memory). Inspection flips `keep_probs` and reads `last_probs`/`last_experts` on the
    shadow, so it never races with another thread using the model (the server's engine)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def check_layer_head(model, layer: int, head: int | None = None) -> None:
    """Clear errors for an out-of-range layer or head (negative indices are not accepted)."""
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layer:
        raise ValueError(f"layer {layer} is out of range: this model has layers 0..{cfg.n_layer - 1}")
    if head is not None and not 0 <= head < cfg.n_head:
        raise ValueError(f"head {head} is out of range: this model has heads 0..{cfg.n_head - 1} per layer")


def check_length(model, n_tokens: int) -> None:
    if n_tokens == 0:
        raise ValueError("the prompt is empty; give at least one token of text")
    if n_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"the prompt is {n_tokens} tokens, longer than the model's context "
            f"max_seq_len={model.cfg.max_seq_len}; shorten the text"
        )


def _as_batch(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    return ids[None] if ids.dim() == 1 else ids


@torch.no_grad()
def capture_attention(model, ids, layers: Sequence[int] | None = None) -> torch.Tensor:
    """Attention probabilities for a token sequence.

    ids: (T,) or (B, T). Returns (n_layer, H, T, T) for one sequence, or
    (n_layer, B, H, T, T) for a batch; float32 on the CPU. `layers` restricts which layers
    keep their (T x T per head) maps, to bound memory on long prompts; the others are zeros.
    """
    idx = _as_batch(ids)
    check_length(model, idx.shape[1])
    keep = set(range(model.cfg.n_layer) if layers is None else layers)
    for i in keep:
        check_layer_head(model, i)
    m = shadow(model).eval()
    mods = _attention_modules(m)
    for i, mod in enumerate(mods):
        mod.keep_probs = i in keep
    m.hidden(idx.to(next(model.parameters()).device))
    B, T = idx.shape
    out = torch.zeros(len(mods), B, model.cfg.n_head, T, T)
    for i in keep:
        out[i] = mods[i].last_probs.float().cpu()
    return out[:, 0] if torch.as_tensor(ids).dim() == 1 else out


def attention_map(model, ids, layer: int, head: int) -> torch.Tensor:
    """(T, T) attention of one head for one sequence (rows: queries, columns: keys)."""
    check_layer_head(model, layer, head)
    return capture_attention(model, ids, layers=[layer])[layer, head]


# --- per-head statistics (probs: (L, H, T, S) or (L, B, H, T, S)) --------------------


def _heads_last(probs: torch.Tensor) -> torch.Tensor:
    """Normalise to (L, B, H, T, S)."""
    return probs[:, None] if probs.dim() == 4 else probs


def head_entropy(probs: torch.Tensor, skip_first: int = 1) -> torch.Tensor:
    """(L, H) mean entropy in nats of each query's attention distribution. The first
    `skip_first` queries are left out: query 0 can only attend to itself (entropy 0)."""
    p = _heads_last(probs)[..., skip_first:, :]
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return ent.mean(dim=(1, 3))


def previous_token_score(probs: torch.Tensor) -> torch.Tensor:
    """(L, H) mean attention from query t to key t-1, over t >= 1."""
    p = _heads_last(probs)
    return p.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, 3))


def first_token_score(probs: torch.Tensor, skip_first: int = 1) -> torch.Tensor:
    """(L, H) mean attention from query t to key 0, over t >= skip_first (the sink score)."""
    p = _heads_last(probs)
    return p[..., skip_first:, 0].mean(dim=(1, 3))


def induction_score(probs: torch.Tensor, seg_len: int, offset: int = 0) -> torch.Tensor:
    """(L, H) mean attention from a query in the second copy of a repeated segment to the
    key just after the previous occurrence of its token.

    The sequence is [prefix of `offset` tokens][segment of seg_len][the same segment];
    query q = offset + seg_len + i (i >= 0) should attend to key q - seg_len + 1. The last
    query of the segment is included (its target is the first token of the second copy).
    """
    p = _heads_last(probs)
    T = p.shape[-2]
    q = torch.arange(offset + seg_len, min(offset + 2 * seg_len, T))
    k = q - seg_len + 1
    return p[..., q, k].mean(dim=(1, 3))


def chance_level(n_tokens: int, first_query: int) -> float:
    """Mean of 1/(t+1) over queries t = first_query..n_tokens-1: the score of uniform
    causal attention on any one key."""
    ts = range(first_query, n_tokens)
    return sum(1.0 / (t + 1) for t in ts) / max(1, len(ts))


def repeated_random_tokens(
    vocab_size: int,
    seg_len: int,
    batch: int = 8,
    seed: int = 0,
    low: int = 0,
    prefix: Sequence[int] = (),
) -> torch.Tensor:
    """(batch, len(prefix) + 2 * seg_len) sequences: prefix + random segment + the same segment.
    Token ids are drawn uniformly from [low, vocab_size) (use low to skip special tokens)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(low, vocab_size, (batch, seg_len), generator=g)
    pre = torch.tensor(list(prefix), dtype=torch.long).expand(batch, len(prefix))
    return torch.cat([pre, seg, seg], dim=1)


# --- classification ------------------------------------------------------------------

# Thresholds, each a fraction of the attention mass (chance is a few percent for the
# default probe: `chance_level` ~ 0.03 for 2 x 32 tokens). A head that puts >= 40% of its
# mass on one specific key on average is doing that job most of the time; Olsson et al.
# report induction heads at prefix-matching scores well above this on real models.
THRESHOLDS = {"previous_token": 0.4, "induction": 0.4, "sink": 0.4}


@dataclass
class HeadReport:
    """Scores per (layer, head), as nested lists (JSON-ready)."""

    previous_token: list[list[float]]
    induction: list[list[float]]
    sink: list[list[float]]
    entropy: list[list[float]]
    thresholds: dict = field(default_factory=lambda: dict(THRESHOLDS))
    induction_chance: float = 0.0
    probe: dict = field(default_factory=dict)

    def heads(self, kind: str) -> list[tuple[int, int, float]]:
        """(layer, head, score) of heads at or above the threshold for `kind`, best first."""
        scores = getattr(self, kind)
        thr = self.thresholds[kind]
        hits = [(layer, h, s) for layer, row in enumerate(scores) for h, s in enumerate(row) if s >= thr]
        return sorted(hits, key=lambda x: -x[2])

    def top(self, kind: str, n: int = 3) -> list[tuple[int, int, float]]:
        scores = getattr(self, kind)
        allh = [(layer, h, s) for layer, row in enumerate(scores) for h, s in enumerate(row)]
        return sorted(allh, key=lambda x: -x[2])[:n]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("previous_token", "induction", "sink", "entropy")}
        d.update(
            thresholds=self.thresholds,
            induction_chance=self.induction_chance,
            probe=self.probe,
            classified={k: self.heads(k) for k in THRESHOLDS},
        )
        return d


def _rows(t: torch.Tensor) -> list[list[float]]:
    return [[round(float(x), 4) for x in row] for row in t]


def classify_heads(
    model,
    seg_len: int = 32,
    batch: int = 4,
    seed: int = 0,
    low: int = 0,
    prefix: Sequence[int] = (),
    prompt_ids: Sequence[int] | None = None,
) -> HeadReport:
    """Score every head. Previous-token and induction are measured on repeated random
    tokens (prefix + segment + segment); sink and entropy on `prompt_ids` when given (real
    text), otherwise on the same random probe."""
    seg_len = min(seg_len, (model.cfg.max_seq_len - len(prefix)) // 2)
    if seg_len < 2:
        raise ValueError(
            f"the model's context max_seq_len={model.cfg.max_seq_len} is too short for the induction probe"
        )
    vocab = model.cfg.vocab_size
    if not 0 <= low < vocab:
        raise ValueError(f"low={low} must be a token id below vocab_size={vocab}")
    rand = repeated_random_tokens(vocab, seg_len, batch, seed, low, prefix)
    probs = capture_attention(model, rand)  # (L, B, H, T, T)
    text_probs = capture_attention(model, prompt_ids)[:, None] if prompt_ids is not None else probs
    first_q = len(prefix) + seg_len
    return HeadReport(
        previous_token=_rows(previous_token_score(probs)),
        induction=_rows(induction_score(probs, seg_len, offset=len(prefix))),
        sink=_rows(first_token_score(text_probs)),
        entropy=_rows(head_entropy(text_probs)),
        induction_chance=round(chance_level(rand.shape[1], first_q), 4),
        probe=dict(seg_len=seg_len, batch=batch, seed=seed, low=low, prefix=list(prefix)),
    )


# --- plots ---------------------------------------------------------------------------


def plot_attention_grid(
    probs: torch.Tensor,
    labels: Sequence[str],
    path,
    layers: Sequence[int] | None = None,
    max_heads: int = 12,
    title: str = "",
) -> None:
    """Heat maps of every head (columns) of the chosen layers (rows). probs: (L, H, T, T)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(probs.shape[0])) if layers is None else list(layers)
    H = min(probs.shape[1], max_heads)
    T = probs.shape[-1]
    fig, axes = plt.subplots(len(layers), H, figsize=(1.6 * H + 0.5, 1.6 * len(layers) + 0.6), squeeze=False)
    for r, layer in enumerate(layers):
        for h in range(H):
            ax = axes[r][h]
            ax.imshow(probs[layer, h].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle(title or f"attention, {T} tokens (rows: queries, columns: keys)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_attention_head(att: torch.Tensor, labels: Sequence[str], path, title: str) -> None:
    """One head's (T, T) map with token labels on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = att.shape[0]
    size = min(10, 2 + 0.25 * T)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(att.numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if T <= 48:
        short = [repr(s)[1:-1][:10] for s in labels]
        ax.set_xticks(range(T), short, rotation=90, fontsize=7)
        ax.set_yticks(range(T), short, fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_head_scores(report: HeadReport, path, title: str = "") -> None:
    """Four (layer x head) heat maps: previous-token, induction, sink, entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [
        ("previous_token", "previous-token"),
        ("induction", "induction"),
        ("sink", "first-token (sink)"),
        ("entropy", "entropy (nats)"),
    ]
    L, H = len(report.induction), len(report.induction[0])
    fig, axes = plt.subplots(1, 4, figsize=(min(16, 2.0 + 0.45 * H * 4), 1.2 + 0.22 * L + 1.0))
    for ax, (k, name) in zip(axes, kinds):
        data = torch.tensor(getattr(report, k))
        im = ax.imshow(
            data.numpy(),
            cmap="magma",
            vmin=0,
            vmax=(None if k == "entropy" else 1),
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
