"""Logit lens: read next-token guesses off the residual stream after every block.

The model's own prediction is head(final_norm(x_L)) where x_L is the residual stream
after the last block. The logit lens (nostalgebraist, 2020) applies the same final norm
and unembedding to x_l for every earlier layer l, showing how the guess forms with
depth. For the last layer the lens is exactly the model's output distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qkv.inspect.attention import _as_batch, check_length, shadow


@torch.no_grad()
def lens_logits(model, ids) -> torch.Tensor:
    """(n_layer, T, vocab) logits read from each block's residual stream for one sequence."""
    idx = _as_batch(ids)
    if idx.shape[0] != 1:
        raise ValueError("the logit lens takes one sequence at a time")
    check_length(model, idx.shape[1])
    m = shadow(model).eval()  # eval() on a shadow: the caller's model keeps its mode
    residuals: list[torch.Tensor] = []
    m.hidden(idx.to(next(model.parameters()).device), collect=residuals)
    stack = torch.stack([r[0] for r in residuals])  # (L, T, d)
    return m.head(m.final_norm(stack)).float().cpu()


@dataclass
class LensResult:
    """top[l][t] = [(token_id, prob), ...] best first, for layer l and position t."""

    top: list[list[list[tuple[int, float]]]]
    tokens: list[int]

    def to_dict(self, decode=None) -> dict:
        def name(i):
            return decode([i]) if decode else str(i)

        return {
            "tokens": [name(t) for t in self.tokens],
            "layers": [
                [[{"id": i, "token": name(i), "prob": round(p, 4)} for i, p in pos] for pos in layer]
                for layer in self.top
            ],
        }


def logit_lens(model, ids: Sequence[int], k: int = 5) -> LensResult:
    logits = lens_logits(model, ids)
    probs, top = logits.softmax(-1).topk(k, dim=-1)
    out = [
        [[(int(i), float(p)) for i, p in zip(top[layer, t], probs[layer, t])] for t in range(top.shape[1])]
        for layer in range(top.shape[0])
    ]
    return LensResult(top=out, tokens=[int(t) for t in torch.as_tensor(ids).reshape(-1)])


def plot_logit_lens(
    result: LensResult,
    labels: Sequence[str],
    guess: Sequence[str],
    path,
    title: str = "",
    max_positions: int = 16,
    layers: Sequence[int] | None = None,
) -> None:
    """Grid: rows = layers (last at the top), columns = positions; each cell shows the
    top-1 guess, coloured by its probability. labels: input tokens; guess: decode of id."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, T = len(result.top), len(result.top[0])
    t0 = max(0, T - max_positions)
    layers = list(range(L)) if layers is None else list(layers)
    cols = range(t0, T)
    probs = torch.tensor([[result.top[layer][t][0][1] for t in cols] for layer in layers])
    fig, ax = plt.subplots(figsize=(1.0 + 0.85 * len(cols), 0.8 + 0.28 * len(layers)))
    ax.imshow(probs.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    for r, layer in enumerate(layers):
        for c, t in enumerate(cols):
            txt = repr(guess(result.top[layer][t][0][0]))[1:-1][:8]
            ax.text(c, r, txt, ha="center", va="center", fontsize=6, color="black" if probs[r, c] < 0.6 else "white")
    ax.set_xticks(range(len(cols)), [repr(labels[t])[1:-1][:8] for t in cols], rotation=60, fontsize=7)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("input token (guess is for the token after it)", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    ax.set_title(title or "logit lens: top-1 next-token guess per layer (colour = probability)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
