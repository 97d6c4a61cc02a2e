"""Watch an induction head form: train a toy attention-only model on repeated random
segments and score its heads as it learns.

Model: 2 layers, 4 heads, d 64, RoPE, no MLP (`mlp="none"`), the attention-only setting of
Olsson et al. (2022), "In-context learning and induction heads". To continue a repeated
random segment the model must copy "what came after the previous occurrence of this
token": a layer-0 previous-token head writes each token's predecessor into its residual
stream, and a layer-1 head matches the current token against it (K-composition). So the
induction score must appear in layer 1, not 0, and the copy loss drops when it does (the
paper's "phase change"). Measured on a 2-core CPU (seeds 0-3, ~20 s): the loss sits near
3.7 nats for ~600 steps, then falls to ~1.0 by step 1000 while the best layer-1 score jumps
from ~0.05 to 0.65-0.70. With learned positions instead of RoPE nothing forms in 1,500
steps: the previous-token head must first learn positions from scratch.

Training data: [random prefix][segment of L random tokens][the same segment][random
suffix], L and the prefix length drawn per sequence, loss on the repeated copy only.
Random tokens make the copy unpredictable except by looking back; varying L and the offset
stops a fixed-offset positional head from solving the task.

The probe (`induction_scores`) uses fresh random segments of two lengths (13 and 16) and
keeps each head's minimum, so a head attending to a fixed relative position (right for one
length only) does not count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qkv.config import ModelConfig
from qkv.inspect.attention import classify_heads
from qkv.model import build_model

PROBE_LENGTHS = (13, 16)


@dataclass
class ToyInductionConfig:
    vocab_size: int = 64
    seq_len: int = 33
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    pos: str = "rope"
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    probe_every: int = 100  # score the heads every this many steps (0: only at the end)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size,
            n_layer=self.n_layer,
            d_model=self.d_model,
            n_head=self.n_head,
            max_seq_len=self.seq_len,
            pos=self.pos,
            mlp="none",
        )


@dataclass
class ToyInductionResult:
    model: torch.nn.Module
    scores: torch.Tensor  # (n_layer, n_head) induction score at the end
    previous_token: torch.Tensor  # (n_layer, n_head) previous-token score at the end
    losses: list[float]  # copy loss per step
    history: list[dict] = field(
        default_factory=list
    )  # per probe: step, mean loss of the last 10 steps, best scores, layer

    def summary(self) -> dict:
        layer, head = divmod(int(self.scores.argmax()), self.scores.shape[1])
        return {
            "best_induction": round(float(self.scores.max()), 4),
            "layer": layer,
            "head": head,
            "best_previous_token": round(float(self.previous_token.max()), 4),
            "final_loss": round(sum(self.losses[-50:]) / len(self.losses[-50:]), 4),
        }


def repeated_segment_batch(
    n: int, vocab_size: int, seq_len: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, seq_len), mask (n, seq_len - 1)): random tokens with one segment repeated; the
    mask marks the next-token targets inside the second copy."""
    x = torch.randint(0, vocab_size, (n, seq_len), generator=g)
    mask = torch.zeros(n, seq_len - 1, dtype=torch.bool)
    for b in range(n):
        L = int(torch.randint(4, (seq_len - 1) // 2 + 1, (1,), generator=g))
        p = int(torch.randint(0, seq_len - 2 * L + 1, (1,), generator=g))
        x[b, p + L : p + 2 * L] = x[b, p : p + L]
        mask[b, p + L - 1 : p + 2 * L - 1] = True
    return x, mask


def induction_scores(model) -> tuple[torch.Tensor, torch.Tensor]:
    """((L, H) induction, (L, H) previous-token): each the minimum over the probe lengths."""
    reports = [classify_heads(model, seg_len=n, batch=16, seed=i + 1) for i, n in enumerate(PROBE_LENGTHS)]
    ind = torch.stack([torch.tensor(r.induction) for r in reports]).amin(0)
    prev = torch.stack([torch.tensor(r.previous_token) for r in reports]).amin(0)
    return ind, prev


def train_toy_induction(
    cfg: ToyInductionConfig | None = None, log: Callable[[dict], None] | None = None
) -> ToyInductionResult:
    """Train the toy on one thread (its matmuls are tiny) and probe it every `probe_every` steps."""
    cfg = cfg or ToyInductionConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model_config())
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(cfg.seed)
        losses: list[float] = []
        history: list[dict] = []

        def probe(step: int) -> None:
            model.eval()
            ind, prev = induction_scores(model)
            model.train()
            recent = losses[-10:]
            row = {
                "step": step,
                "loss": round(sum(recent) / len(recent), 4) if recent else None,
                "best_induction": round(float(ind.max()), 4),
                "layer": int(ind.max(dim=1).values.argmax()),
                "best_previous_token": round(float(prev.max()), 4),
            }
            history.append(row)
            if log is not None:
                log(row)

        model.train()
        for step in range(cfg.steps):
            if cfg.probe_every and step % cfg.probe_every == 0:
                probe(step)
            x, mask = repeated_segment_batch(cfg.batch_size, cfg.vocab_size, cfg.seq_len, g)
            loss = F.cross_entropy(model(x[:, :-1])[mask], x[:, 1:][mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        probe(cfg.steps)
        model.eval()
        ind, prev = induction_scores(model)
    finally:
        torch.set_num_threads(threads)
    return ToyInductionResult(model, ind, prev, losses, history)


def plot_phase_change(result: ToyInductionResult, path, cfg: ToyInductionConfig | None = None) -> None:
    """Copy loss (left axis) and the best induction / previous-token scores (right axis) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result.history
    steps = [r["step"] for r in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(result.losses) + 1), result.losses, color="0.7", lw=0.8, label="copy loss (per step)")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss on the repeated copy (nats)")
    right = ax.twinx()
    right.plot(steps, [r["best_induction"] for r in h], "o-", color="tab:red", ms=3, label="best induction score")
    right.plot(
        steps, [r["best_previous_token"] for r in h], "s-", color="tab:blue", ms=3, label="best previous-token score"
    )
    right.set_ylim(0, 1)
    right.set_ylabel("head score (attention mass on the right key)")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center left", fontsize=8)
    c = cfg or ToyInductionConfig()
    ax.set_title(
        f"Induction head forming: {c.n_layer}-layer attention-only model, {c.pos}, vocab {c.vocab_size}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
