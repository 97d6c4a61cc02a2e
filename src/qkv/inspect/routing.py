"""MoE routing: which experts each token goes to, per layer, and how evenly load spreads.

Each MoE module stores `last_experts` (tokens, k) after a forward. A forward on a private
shadow of the model (see attention.shadow) keeps this from racing with other users of the
same model, such as the server's engine thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qkv.inspect.attention import _as_batch, check_length, shadow
from qkv.model.moe import MoE


@torch.no_grad()
def expert_choices(model, ids) -> torch.Tensor:
    """(n_moe_layers, T, k) expert ids chosen for each token of one sequence."""
    if not model.cfg.is_moe:
        raise ValueError("this model is dense (n_expert=0): it has no experts to route to")
    idx = _as_batch(ids)
    if idx.shape[0] != 1:
        raise ValueError("routing takes one sequence at a time")
    check_length(model, idx.shape[1])
    m = shadow(model)
    m.eval()
    m.hidden(idx.to(next(model.parameters()).device))
    return torch.stack([mod.last_experts.cpu() for mod in m.modules() if isinstance(mod, MoE)])


def routing_report(model, ids: Sequence[int]) -> dict:
    """Per-layer expert load (share of the token slots each expert received) and each
    token's chosen experts. Load is 1/n_expert everywhere under perfect balance."""
    ch = expert_choices(model, ids)  # (L, T, k)
    E = model.cfg.n_expert
    counts = torch.stack([torch.bincount(layer.reshape(-1), minlength=E) for layer in ch])  # (L, E)
    load = counts.float() / counts.sum(-1, keepdim=True)
    return {
        "n_expert": E,
        "top_k": model.cfg.n_expert_per_token,
        "load": [[round(float(x), 4) for x in row] for row in load],
        "max_load_over_uniform": [round(float(row.max() * E), 3) for row in load],
        "choices": ch.tolist(),  # [layer][token][k]
    }


def plot_routing(report: dict, labels: Sequence[str], path, layer: int = 0, title: str = "") -> None:
    """Left: expert load per layer. Right: experts chosen by each token in one layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = torch.tensor(report["load"])
    ch = torch.tensor(report["choices"])  # (L, T, k)
    if not 0 <= layer < ch.shape[0]:
        raise ValueError(f"layer {layer} is out of range: this model has MoE layers 0..{ch.shape[0] - 1}")
    E, T = report["n_expert"], ch.shape[1]
    onehot = torch.zeros(E, T)
    for t in range(T):
        onehot[ch[layer, t], t] = 1
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(4 + min(10, 0.3 * T), 3.5), gridspec_kw={"width_ratios": [1, 2]})
    im = a1.imshow(load.numpy(), cmap="viridis", aspect="auto", vmin=0)
    a1.set_xticks(range(E))
    a1.set_yticks(range(load.shape[0]))
    a1.set_xlabel("expert")
    a1.set_ylabel("MoE layer")
    a1.set_title("expert load (share of slots)", fontsize=9)
    fig.colorbar(im, ax=a1, fraction=0.046)
    a2.imshow(onehot.numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    if T <= 40:
        a2.set_xticks(range(T), [repr(s)[1:-1][:8] for s in labels], rotation=90, fontsize=7)
    a2.set_yticks(range(E))
    a2.set_ylabel("expert (black = chosen)")
    a2.set_title(f"layer {layer}: experts chosen per token", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
