"""Model-side pieces of alignment: scalar heads, response log-probs, engine rollouts.

- `RewardModel`: the transformer + a scalar head read at the last non-padding token
  (Stiennon et al. 2020). Saved as a qkv checkpoint whose weights add `score.*`.
- `PolicyWithValue`: the policy with a value head on the same trunk (one forward gives
  token log-probs and values; the value loss is scaled by vf_coef so it cannot swamp
  the policy). The value head starts from zero, so V = 0 at the first rollout.
- `response_logprobs`: log pi(token) for every response token of right-padded
  prompt+response batches, optionally at a sampling temperature.
- `rollout`: batched sampling through the qkv Engine (continuous batching over a paged
  KV cache), with a seed per request so rollouts are reproducible; pure temperature
  sampling (no top-k/top-p), so the tokens come from exactly the distribution whose
  log-probs PPO uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from qkv.align.data import batch_sequences, encode_prompt
from qkv.align.losses import gather_logprobs
from qkv.config import ModelConfig
from qkv.model import Transformer
from qkv.model.loss import tiled_logprobs

HEAD_FILE = "head.json"  # marks a checkpoint with a scalar head: {"head": "score"|"value"}


class RewardModel(Transformer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.d_model, 1)
        nn.init.normal_(self.score.weight, 0.0, 1 / (cfg.d_model + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    def rewards(self, ids: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        """(B,) scalar rewards at each sequence's last real token (right padding)."""
        h = self.hidden(ids, key_padding=key_padding)
        last = key_padding.long().sum(1) - 1
        return self.score(h[torch.arange(len(ids), device=ids.device), last]).squeeze(-1).float()


class PolicyWithValue(Transformer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.value_head = nn.Linear(cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def logprobs_and_values(self, ids, key_padding, temperature: float = 1.0):
        """Log-probs of ids[:, 1:] (B, T-1) and the values V(s_t) of the states that
        predict them (B, T-1)."""
        h = self.hidden(ids, key_padding=key_padding)[:, :-1]
        logits = self.head(h)
        return gather_logprobs(logits, ids[:, 1:], temperature), self.value_head(h).squeeze(-1).float(), logits


def from_transformer(cls, base: Transformer):
    """A head model initialised from a plain checkpoint's weights (head freshly initialised)."""
    model = cls(base.cfg)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.split(".")[0] in ("score", "value_head") for k in missing), (missing, unexpected)
    return model.to(next(base.parameters()).device)


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The language-model weights only (heads dropped): what load_model reads."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("score.", "value_head."))}


def save_reward_model(
    directory: str | Path, model: RewardModel, tokenizer=None, metrics: dict | None = None, weights: bool = True
) -> Path:
    """The reward model as a checkpoint plus head.json; weights=False writes head.json only
    (after training, whose final save already put the weights there)."""
    from qkv.checkpoint import save_model
    from qkv.io import atomic_write_text

    if weights:
        save_model(directory, model, tokenizer)
    atomic_write_text(Path(directory) / HEAD_FILE, json.dumps({"head": "score", **(metrics or {})}) + "\n")
    return Path(directory)


def load_reward_model(directory: str | Path, device: str = "cpu") -> RewardModel:
    from qkv.checkpoint import CONFIG, WEIGHTS, load_state_into, read_safetensors

    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such reward-model directory")
    state = read_safetensors(directory / WEIGHTS)
    if "score.weight" not in state:
        raise ValueError(f"{directory}: not a reward model (no score head); train one with `qkv reward`")
    model = RewardModel(ModelConfig.load(directory / CONFIG))
    load_state_into(model, state, directory / WEIGHTS)
    return model.to(device).eval()


def head_logprobs(model: Transformer, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """gather_logprobs(model.head(h), targets, temperature); a head the model lends a tile of
    rows at a time (a frozen quantized tied head, QLoRA) is read that way: no whole fp32
    table and no (..., V) logits (Gemma 3's 262,144 x 640 table is 671 MB in fp32)."""
    weight = model.loss_weight()
    if not isinstance(weight, torch.Tensor) and model.cfg.final_softcap is None:
        return tiled_logprobs(h, weight, targets, temperature)
    return gather_logprobs(model.head(h), targets, temperature)


def response_logprobs(
    model: Transformer, ids: torch.Tensor, key_padding: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log pi(ids[:, t+1] | ids[:, :t+1]) for all t: (B, T-1) in fp32."""
    h = model.hidden(ids, key_padding=key_padding)[:, :-1]
    return head_logprobs(model, h, ids[:, 1:], temperature)


def sequence_logprobs(model: Transformer, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """Sum of response-token log-probs per sequence (B,): batch from data.batch_sequences.
    The head runs only at the positions that predict a response token: a preference pair's
    prompt is most of its tokens, and a large vocabulary's logits are most of the work (Gemma's
    262k: a batch of 64 sequences x 40 positions is 2.7 GB of fp32 logits at every position)."""
    ids, mask = batch["ids"], batch["mask"][:, 1:].bool()
    h = model.hidden(ids, key_padding=batch["key_padding"])[:, :-1]
    lp = head_logprobs(model, h[mask], ids[:, 1:][mask], temperature)
    row = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(mask)[mask]
    return torch.zeros(ids.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, row, lp)


# --- rollouts -------------------------------------------------------------------------
@dataclass
class Rollout:
    prompts: list[list[dict]]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # EOS included when the model stopped
    texts: list[str]
    finished: list[bool]  # True if the response ended with EOS

    def batch(self, pad_id: int, max_len: int) -> dict:
        """prompt+response right-padded, mask on response tokens."""
        seqs, masks = [], []
        for p, r in zip(self.prompt_ids, self.response_ids):
            s = (p + r)[:max_len]
            seqs.append(s)
            masks.append([i >= len(p) for i in range(len(s))])
        return batch_sequences(seqs, masks, pad_id)


@torch.no_grad()
def rollout(
    model: Transformer,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    n: int = 1,
    max_num_seqs: int = 64,
) -> Rollout:
    """Sample n responses per prompt with the qkv Engine (batched, continuous batching).
    Request i gets its own seed derived from (seed, i), so a rollout is reproducible
    whatever else is batched; n <= 1024."""
    from qkv.infer.engine import Engine
    from qkv.infer.sampling import SamplingParams

    was_training = model.training
    engine = Engine(
        model, tokenizer, max_num_seqs=max_num_seqs, max_batch_tokens=max(512, 8 * max_num_seqs), prefix_caching=False
    )
    pids = [encode_prompt(tokenizer, p) for p in prompts]
    # the engine seeds sample j of a request with seed + j: space the requests' seeds so no
    # two samples of one rollout share a random stream
    params = [
        SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0, seed=(seed * 7919 + i) * 1024, n=n
        )
        for i in range(len(prompts))
    ]
    results = engine.generate(pids, params)
    model.train(was_training)
    eos = tokenizer.eos_id
    out = Rollout([], [], [], [], [])
    for p, ids, res in zip(prompts, pids, results):
        for r in res:
            out.prompts.append(p)
            out.prompt_ids.append(ids)
            out.response_ids.append(list(r.token_ids))
            out.texts.append(tokenizer.decode([t for t in r.token_ids if t != eos], skip_special=True))
            out.finished.append(bool(r.token_ids) and r.token_ids[-1] == eos)
    return out
