"""Fused linear + cross-entropy: the language-model loss without materialising all logits.

For a vocabulary of V and N tokens, `F.cross_entropy(h @ W.T, y)` stores an N x V logits
tensor, its log-softmax, and an N x V gradient, then walks them three more times in
backward. Here the tokens are processed in chunks: each chunk's logits are formed, its
loss and its gradient (softmax - one_hot) computed at once, and the gradients for h and W
accumulated right away. Backward only rescales the stored gradients. Same matmuls,
a fraction of the memory traffic (the idea of Liger-Kernel's FusedLinearCrossEntropy).
Gradients are built only when autograd can call backward: under torch.no_grad (evaluation)
the same chunks give the loss alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

# (logits chunk, targets, valid, want_grad) -> (summed loss, gradient or None), or None for
# logits it does not take: a faster softmax step that the training side may install (the
# native bf16 kernel, kernels/cross_entropy.py); the model itself stays plain PyTorch.
RowKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, bool], "tuple[torch.Tensor, torch.Tensor | None] | None"
]
_row_kernel: RowKernel | None = None


def install_row_kernel(kernel: RowKernel | None) -> None:
    """Let `kernel` do each chunk's softmax step for the logits it takes (None: PyTorch's ops)."""
    global _row_kernel
    _row_kernel = kernel


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk: int):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, n_valid, grad_h, grad_w = _loss_and_grads(h, weight, targets, ignore_index, chunk, want_h, want_w)
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def _loss_and_grads(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    chunk: int,
    want_h: bool,
    want_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(summed loss, number of counted targets, d sum / d h, d sum / d weight), chunk by chunk;
    a gradient that is not wanted is neither built nor stored (None)."""
    n = h.shape[0]
    valid = targets != ignore_index
    n_valid = valid.sum().clamp(min=1)
    safe_targets = torch.where(valid, targets, 0)
    # the products run in the autocast dtype when autocast is on (h arrives in fp32 from the
    # final norm, and a product with an out= tensor would otherwise stay in fp32)
    compute = _compute_dtype(h)
    hq, w = h.to(compute), weight.to(compute)
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, n, chunk):
        hc, tc, vc = hq[s : s + chunk], safe_targets[s : s + chunk], valid[s : s + chunk]
        logits = hc @ w.t()
        done = _row_kernel(logits, tc, vc, want_h or want_w) if _row_kernel is not None else None
        if done is not None:
            chunk_loss, g = done
            total += chunk_loss
        else:  # one fused log-softmax pass (faster than logsumexp, then subtract and exp again)
            logp = torch.log_softmax(logits.float(), dim=-1)
            total -= (logp.gather(1, tc[:, None]).squeeze(1) * vc).sum()
            g = _logits_grad(logp, tc, vc).to(compute) if want_h or want_w else None
        if g is not None:
            if grad_h is not None:
                if compute == h.dtype:  # straight into the gradient, no temporary
                    torch.mm(g, w, out=grad_h[s : s + chunk])
                else:  # a bf16 product, widened into h's dtype
                    grad_h[s : s + chunk] = g @ w
            if grad_w is not None:
                if compute == torch.float32:
                    grad_w.addmm_(g.t(), hc)
                else:  # a bf16 product (fp32 accumulation inside, as autocast's linears get), summed in fp32
                    grad_w += g.t() @ hc
    return total, n_valid, grad_h, grad_w


def _logits_grad(logp: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """d(summed loss)/d(logits) of one chunk, softmax - one_hot (zero on ignored rows), built
    in place of its log-probabilities."""
    g = logp.exp_()
    g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
    g *= valid[:, None]
    return g


class WeightRows(Protocol):
    """A frozen (V, d) weight lent a tile of rows at a time: a head kept in quantized blocks,
    which the loss then never expands whole to fp32 (Gemma 3's tied 262,144 x 640 table
    would be 671 MB a step)."""

    shape: tuple[int, int]
    group: int  # a tile starts on a multiple of this (the layout's row groups)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop as an fp32 (stop - start, d) tensor."""
        ...


class _TiledLogProbs(torch.autograd.Function):
    """log softmax(h @ W.T / temperature)[targets] per row, W a frozen WeightRows: no
    gradient for W. One pass over W's tiles gives each row's log-sum-exp (a running max and
    sum of exponentials, online) and its target's logit, and, when a gradient will be wanted,
    its whole gradient direction d lp / d h = (W[target] - softmax @ W) / temperature: the
    softmax-weighted sum of W's rows is accumulated tile by tile and rescaled whenever the
    running max moves, as flash attention accumulates its output. The backward only scales
    each row's direction by its incoming gradient, so each tile is dequantized once a step.
    A tile of logits for all rows is at most 2^22 elements, as in the untiled loss."""

    @staticmethod
    def forward(ctx, h, weight: WeightRows, targets, temperature: float):
        lp, direction = _tiled_pass(h, weight, targets, temperature, want_grad=True)
        ctx.save_for_backward(direction)
        return lp

    @staticmethod
    def backward(ctx, grad_out):
        (direction,) = ctx.saved_tensors
        return (direction * grad_out.float()[:, None]).to(direction.dtype), None, None, None


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The products' dtype: autocast's when it is on (as its own linears would run), else h's."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def _tiles(n_rows: int, weight: WeightRows) -> list[tuple[int, int]]:
    """(start, stop) of the tiles of W's rows, each starting on a group, sized so that a
    tile's logits for n_rows rows hold at most 2^22 elements."""
    v, group = weight.shape[0], max(1, weight.group)
    tile = max(group, (2**22 // max(n_rows, 1)) // group * group)
    return [(start, min(start + tile, v)) for start in range(0, v, tile)]


def _tiled_pass(
    h: torch.Tensor, weight: WeightRows, targets: torch.Tensor, temperature: float, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's log-probability of its target under softmax(h @ W.T / temperature), and
    (want_grad) its gradient with respect to h, in one pass over W's tiles."""
    compute = _compute_dtype(h)
    hq, n = h.to(compute), h.shape[0]
    rows = torch.arange(n, device=h.device)
    run_max = torch.full((n,), float("-inf"), device=h.device)
    run_sum = torch.zeros(n, device=h.device)
    target_logit = torch.zeros(n, device=h.device)
    expected = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if want_grad else None  # sum e^(l - max) w
    chosen = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if want_grad else None  # W[target]
    for start, stop in _tiles(n, weight):
        w = weight.rows(start, stop).to(compute)
        logits = (hq @ w.t()).float() / temperature
        new_max = torch.maximum(run_max, logits.amax(1))
        rescale = torch.exp(run_max - new_max)
        e = torch.exp(logits - new_max[:, None])
        run_sum = run_sum * rescale + e.sum(1)
        run_max = new_max
        here = (targets >= start) & (targets < stop)
        target_logit[here] = logits[rows[here], targets[here] - start]
        if expected is not None and chosen is not None:
            expected.mul_(rescale[:, None]).add_((e.to(compute) @ w).float())
            chosen[here] = w[targets[here] - start].float()
    lp = target_logit - (run_max + torch.log(run_sum))
    if expected is None or chosen is None:
        return lp, None
    return lp, ((chosen - expected / run_sum[:, None]) / temperature).to(h.dtype)


def tiled_logprobs(
    h: torch.Tensor, weight: WeightRows, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(h @ W.T / temperature)[targets] in fp32, (...) for h (..., d) and targets
    (...), with W lent a tile of rows at a time (a frozen quantized head): what
    `gather_logprobs(F.linear(h, W), targets, temperature)` gives, differentiable in h, with
    no (..., V) logits and no whole fp32 W."""
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and h2.requires_grad:
        lp = _TiledLogProbs.apply(h2, weight, t2, temperature)
    else:
        lp, _ = _tiled_pass(h2, weight, t2, temperature, want_grad=False)
    return lp.reshape(targets.shape)


def fused_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor | WeightRows,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_elems: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight.T against targets (ignore_index skipped).

    h: (..., d), weight: (V, d) (or a frozen WeightRows, lent a tile of rows at a time),
    targets: (...). chunk_elems bounds the logits held at once.
    By default a chunk holds 2^22 logits (16 MB in fp32), which keeps its softmax passes in
    the CPU's cache (a bf16 step at vocab 8192 ran 20-25% faster than with whole-batch
    chunks), and at least 128 rows, so each read of a large vocabulary's weight serves
    enough tokens.
    When no backward can follow (torch.no_grad / inference_mode, or nothing requires a
    gradient) only the loss is computed: evaluation costs what plain cross-entropy does."""
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if not isinstance(weight, torch.Tensor):  # a frozen head lent in tiles: the mean of -log p
        valid = t2 != ignore_index
        lp = tiled_logprobs(h2, weight, torch.where(valid, t2, 0))
        return -(lp * valid).sum() / valid.sum().clamp(min=1)
    v = weight.shape[0]
    chunk = max(128, 2**22 // v) if chunk_elems is None else max(1, chunk_elems // v)
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(h2, weight, t2, ignore_index, chunk)
    total, n_valid, _, _ = _loss_and_grads(h2, weight, t2, ignore_index, chunk, False, False)
    return total / n_valid
