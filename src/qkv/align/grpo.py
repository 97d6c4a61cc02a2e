"""GRPO (Shao et al. 2024; DeepSeek-R1): PPO without a value model.

Per iteration: G responses per prompt from the qkv Engine (n = G samples sharing the
prompt's KV blocks); a programmatic reward (the task's gold judge, or any callable) or a
reward model scores them; each response's advantage is its reward standardised within
its group, A_i = (r_i - mean) / (std + 1e-4), applied to every token. The loss is the
clipped ratio objective plus beta * k3 KL to the frozen reference, normalised per token
over the minibatch (long and short answers weigh by their tokens). Several epochs per
batch as in PPO; checkpoints at iteration boundaries, stats in out_dir/rollouts.jsonl.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qkv.align import losses as L
from qkv.align.data import as_messages, check_same_vocab, require_chat_template, rollout_minibatch
from qkv.align.policy import response_logprobs, rollout

RewardFn = Callable[[list[dict], str], float]


@dataclass
class GRPOConfig:
    prompts_per_iter: int = 16
    group_size: int = 4  # G
    ppo_epochs: int = 2
    max_new_tokens: int = 24
    temperature: float = 1.0
    clip: float = 0.2
    beta: float = 0.04  # k3 KL weight
    scale_rewards: bool = True
    missing_eos_penalty: float | None = 1.0


class GRPORun:
    def __init__(self, policy, ref_model, tokenizer, prompts: list, reward_fn: RewardFn, grpo: GRPOConfig, train_cfg):
        require_chat_template(tokenizer)
        check_same_vocab(policy, ref_model, "the policy", "the reference model")
        self.n = grpo.prompts_per_iter * grpo.group_size
        if self.n % train_cfg.batch_size:
            raise ValueError(
                f"prompts_per_iter x group_size = {self.n} must be a multiple of batch_size={train_cfg.batch_size}"
            )
        if grpo.group_size < 2:
            raise ValueError("group_size must be >= 2: advantages compare samples of the same prompt")
        self.policy, self.ref, self.tok = policy, ref_model.eval(), tokenizer  # ref: used under no_grad only
        self.prompts = [as_messages(p) for p in prompts]
        self.reward_fn, self.g, self.cfg = reward_fn, grpo, train_cfg
        self.n_mb = self.n // train_cfg.batch_size
        self.steps_per_iter = grpo.ppo_epochs * self.n_mb
        self.iteration, self.buf, self.stats = -1, {}, []

    @torch.no_grad()
    def make_rollout(self, it: int) -> None:
        g, dev = self.g, next(self.policy.parameters()).device
        P = g.prompts_per_iter
        prompts = [self.prompts[(it * P + i) % len(self.prompts)] for i in range(P)]
        ro = rollout(
            self.policy,
            self.tok,
            prompts,
            g.max_new_tokens,
            g.temperature,
            seed=self.cfg.seed * 1_000_003 + it,
            n=g.group_size,
            max_num_seqs=self.n,
        )
        rewards = torch.tensor([self.reward_fn(p, t) for p, t in zip(ro.prompts, ro.texts)], dtype=torch.float32)
        rewards = L.apply_eos_penalty(rewards, torch.tensor(ro.finished), g.missing_eos_penalty)
        adv = L.group_advantages(rewards, g.group_size, g.scale_rewards)
        b = {k: v.to(dev) for k, v in ro.batch(self.tok.pad_id, self.policy.cfg.max_seq_len).items()}
        ids, kp, mask = b["ids"], b["key_padding"], b["mask"][:, 1:].float()
        was = self.policy.training
        self.policy.eval()
        old = response_logprobs(self.policy, ids, kp, g.temperature)
        self.policy.train(was)
        ref = response_logprobs(self.ref, ids, kp, g.temperature)
        self.buf = dict(ids=ids, key_padding=kp, mask=mask, old_logp=old, ref_logp=ref, adv=adv.to(dev))
        self.stats.append(
            {
                "iteration": it,
                "step": it * self.steps_per_iter,
                "reward": rewards.mean().item(),
                "kl": (L.kl_k1(old, ref) * mask).sum(1).mean().item(),
                "response_length": sum(map(len, ro.response_ids)) / len(ro.response_ids),
                "eos_rate": sum(ro.finished) / len(ro.finished),
                "sample": ro.texts[0],
            }
        )
        self.iteration = it

    def get_batch(self, step: int, micro: int) -> dict:
        it, idx = rollout_minibatch(step, micro, self.steps_per_iter, self.n, self.cfg)
        if it != self.iteration:
            self.make_rollout(it)
        idx = idx.to(self.buf["ids"].device)
        return {k: v[idx] for k, v in self.buf.items()}

    def loss_fn(self, model, batch):
        lp = response_logprobs(model, batch["ids"], batch["key_padding"], self.g.temperature)
        loss, m = L.grpo_loss(
            lp, batch["old_logp"], batch["ref_logp"], batch["adv"], batch["mask"], self.g.clip, self.g.beta
        )
        return loss, {"tokens": int(batch["mask"].sum()), **m}


def run_grpo(
    policy,
    ref_model,
    tokenizer,
    prompts: list,
    reward_fn: RewardFn,
    train_cfg,
    grpo: GRPOConfig,
    n_iterations: int | None = None,
    resume: bool = False,
):
    """Train `policy` in place with GRPO; returns (TrainResult, per-iteration stats)."""
    import json

    from qkv.io import atomic_write_text
    from qkv.train import Trainer

    run = GRPORun(policy, ref_model, tokenizer, prompts, reward_fn, grpo, train_cfg)
    spi = run.steps_per_iter
    updates = {"schedule": "constant", "warmup_steps": 0}
    if n_iterations is not None:
        updates["max_steps"] = n_iterations * spi
    elif train_cfg.max_steps % spi:
        updates["max_steps"] = math.ceil(train_cfg.max_steps / spi) * spi
    if train_cfg.save_every and train_cfg.save_every % spi:
        updates["save_every"] = math.ceil(train_cfg.save_every / spi) * spi
    cfg = train_cfg.replace(**updates)
    run.cfg = cfg
    trainer = Trainer(
        policy,
        cfg,
        run.loss_fn,
        run.get_batch,
        tokenizer=tokenizer,
        resume=resume,
        extra_state={"stage": "grpo", "grpo": asdict(grpo)},
    )
    result = trainer.fit()
    atomic_write_text(Path(cfg.out_dir) / "rollouts.jsonl", "".join(json.dumps(s) + "\n" for s in run.stats))
    return result, run.stats
