"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022; Huang et al. 2024, "N+ details").

One PPO iteration:
  1. rollout: sample one response per prompt with the qkv Engine (batched), at the
     sampling temperature T, pure sampling (no top-k/top-p) -> the tokens come from the
     exact distribution softmax(logits / T) whose log-probs are used below;
  2. score: log pi_old, V_old (policy + value head), log pi_ref (frozen SFT model), all
     with logits / T; the reward model's score of prompt + response; responses that never
     emitted EOS get `missing_eos_penalty` subtracted;
  3. per-token reward r_t = -beta * KL_t (k1 or k3) plus the score on the last token;
     beta from the adaptive (Ziegler) or fixed KL controller;
  4. GAE (gamma, lambda; V = 0 after the last token), advantages whitened over the batch;
  5. `ppo_epochs` passes of shuffled minibatches: clipped policy loss + vf_coef * clipped
     value loss (+ ptx_coef * next-token loss on pretraining text: PPO-ptx).

Steps 5 are optimizer steps of the shared Trainer (checkpoints, resume, metrics.jsonl);
steps 1-4 happen inside its batch source when a new iteration starts. Checkpoints are
written only at iteration boundaries, so resume regenerates exactly the next rollout
(engine requests carry seeds). Each iteration's statistics (proxy score, gold score when a
judge is given, KL, entropy, length, distinct outputs, EOS rate, beta) go to
out_dir/rollouts.jsonl; the over-optimisation plot reads it.

With LoRA adapters on the policy (qkv ppo --lora-r), the adapters and the value head train
and nothing else; the value head is saved beside the adapter (adapter_heads.safetensors, see
qkv.lora.peft_format) and resumed with it. The reference is then usually the same model with
its adapters off (qkv.lora.BaseView): no second copy of the base.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qkv.align import losses as L
from qkv.align.data import as_messages, check_same_vocab, require_chat_template, rollout_minibatch
from qkv.align.policy import PolicyWithValue, Rollout, plain_state, response_logprobs, rollout
from qkv.io import atomic_write_text

GoldFn = Callable[[list[dict], str], float]


@dataclass
class PPOConfig:
    rollout_batch: int = 64  # prompts (= responses) per PPO iteration
    ppo_epochs: int = 4  # passes over each rollout batch; minibatch = TrainConfig.batch_size
    max_new_tokens: int = 24
    temperature: float = 0.7
    kl_coef: float = 0.05  # initial beta
    adaptive_kl: bool = False  # Ziegler controller (legacy TRL: init 0.2, target 6, horizon 10000)
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"  # k1 | k3 (per-token penalty)
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = 1.0
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining next-token loss
    ptx_seq_len: int = 64
    ptx_batch: int = 8

    def validate(self) -> None:
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator={self.kl_estimator!r}: choose k1 or k3")
        if self.temperature <= 0:
            raise ValueError("PPO samples its rollouts: temperature must be > 0")
        if self.rollout_batch < 2:
            raise ValueError("rollout_batch must be >= 2 (advantages are whitened over the batch)")


def _gold_stats(gold_fn: GoldFn | None, ro: Rollout) -> list[float]:
    return [gold_fn(p, t) for p, t in zip(ro.prompts, ro.texts)] if gold_fn else []


class PPORun:
    """The rollout buffer and batch source of a PPO run (see the module docstring)."""

    def __init__(
        self,
        policy: PolicyWithValue,
        ref_model,
        reward_model,
        tokenizer,
        prompts: list,
        ppo: PPOConfig,
        train_cfg,
        gold_fn: GoldFn | None = None,
        ptx_tokens: torch.Tensor | None = None,
    ):
        ppo.validate()
        require_chat_template(tokenizer)
        check_same_vocab(policy, ref_model, "the policy", "the reference model")
        check_same_vocab(policy, reward_model, "the policy", "the reward model")
        if ppo.rollout_batch % train_cfg.batch_size:
            raise ValueError(
                f"rollout_batch={ppo.rollout_batch} must be a multiple of batch_size={train_cfg.batch_size}"
            )
        if ppo.ptx_coef and ptx_tokens is None:
            raise ValueError("ptx_coef > 0 needs pretraining text (ptx_tokens / --ptx-data)")
        self.policy, self.ref, self.rm, self.tok = policy, ref_model.eval(), reward_model.eval(), tokenizer
        self.prompts = [as_messages(p) for p in prompts]
        self.ppo, self.cfg, self.gold_fn, self.ptx = ppo, train_cfg, gold_fn, ptx_tokens
        self.n_mb = ppo.rollout_batch // train_cfg.batch_size
        self.steps_per_iter = ppo.ppo_epochs * self.n_mb
        if ppo.adaptive_kl:
            self.kl_ctl = L.AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
        else:
            self.kl_ctl = L.FixedKLController(ppo.kl_coef)
        self.iteration = -1
        self.buf: dict = {}
        self.stats: list[dict] = []
        self.extra_state: dict = {"stage": "ppo", "kl_coef": self.kl_ctl.value, "ppo": asdict(ppo)}

    # --- one iteration's data ---------------------------------------------------------
    def _prompts_for(self, it: int) -> list[list[dict]]:
        n, B = len(self.prompts), self.ppo.rollout_batch
        epoch = it * B // n
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        return [self.prompts[perm[(it * B + i) % n]] for i in range(B)]

    @torch.no_grad()
    def make_rollout(self, it: int) -> None:
        ppo, dev = self.ppo, next(self.policy.parameters()).device
        ro = rollout(
            self.policy,
            self.tok,
            self._prompts_for(it),
            ppo.max_new_tokens,
            ppo.temperature,
            seed=self.cfg.seed * 1_000_003 + it,
            max_num_seqs=ppo.rollout_batch,
        )
        b = {k: v.to(dev) for k, v in ro.batch(self.tok.pad_id, self.policy.cfg.max_seq_len).items()}
        was = self.policy.training
        self.policy.eval()
        ids, kp, mask = b["ids"], b["key_padding"], b["mask"][:, 1:].float()
        old_logp, old_v, logits = self.policy.logprobs_and_values(ids, kp, ppo.temperature)
        entropy = L.masked_mean(L.entropy_from_logits(logits, ppo.temperature), mask).item()
        del logits
        # before train mode comes back: a LoRA reference is this very model with its adapters off
        ref_logp = response_logprobs(self.ref, ids, kp, ppo.temperature)
        self.policy.train(was)
        proxy = self.rm.rewards(ids, kp)
        scores = L.apply_eos_penalty(proxy, torch.tensor(ro.finished, device=dev), ppo.missing_eos_penalty)
        kl = L.kl_estimate(old_logp, ref_logp, ppo.kl_estimator) * mask
        k1_sum = (L.kl_k1(old_logp, ref_logp) * mask).sum(1)
        beta = self.kl_ctl.value
        rewards, non_score = L.per_token_rewards(scores, kl, mask, beta)
        if ppo.whiten_rewards:
            rewards = L.whiten(rewards, mask, shift_mean=False)
        adv, returns = L.gae(rewards, old_v, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            adv = L.whiten(adv, mask)
        self.buf = dict(
            ids=ids, key_padding=kp, mask=mask, old_logp=old_logp, old_values=old_v * mask, adv=adv, returns=returns
        )
        gold = _gold_stats(self.gold_fn, ro)
        lengths = [len(r) for r in ro.response_ids]
        stat = {
            "iteration": it,
            "step": it * self.steps_per_iter,
            "kl_coef": beta,
            "score_proxy": proxy.mean().item(),
            "score": scores.mean().item(),
            "kl": k1_sum.mean().item(),
            "kl_k3": (L.kl_k3(old_logp, ref_logp) * mask).sum(1).mean().item(),
            "non_score_reward": non_score.sum(1).mean().item(),
            "entropy": entropy,
            "response_length": sum(lengths) / len(lengths),
            "eos_rate": sum(ro.finished) / len(ro.finished),
            "distinct": len(set(ro.texts)) / len(ro.texts),
            "gold": sum(gold) / len(gold) if gold else None,
            "sample": ro.texts[0],
        }
        self.stats.append(stat)
        self.kl_ctl.update(stat["kl"], ppo.rollout_batch)  # Ziegler: n_steps = batch size
        self.extra_state["kl_coef"] = self.kl_ctl.value
        self.iteration = it

    def get_batch(self, step: int, micro: int) -> dict:
        it, idx = rollout_minibatch(step, micro, self.steps_per_iter, self.ppo.rollout_batch, self.cfg)
        if it != self.iteration:
            self.make_rollout(it)
        idx = idx.to(self.buf["ids"].device)
        batch = {k: v[idx] for k, v in self.buf.items()}
        T = int(batch["key_padding"].sum(1).max())  # drop all-padding columns
        batch = {k: v[:, :T] if k in ("ids", "key_padding") else v[:, : T - 1] for k, v in batch.items()}
        if self.ppo.ptx_coef:
            batch["ptx"] = ptx_windows(self.ptx, self.ppo.ptx_batch, self.ppo.ptx_seq_len, seed=step * 31 + micro)
        return batch

    def loss_fn(self, model, batch) -> tuple[torch.Tensor, dict]:
        ppo = self.ppo
        logp, values, logits = model.logprobs_and_values(batch["ids"], batch["key_padding"], ppo.temperature)
        mask = batch["mask"]
        pol = L.ppo_policy_loss(logp, batch["old_logp"], batch["adv"], mask, ppo.clip)
        vloss, vclip = L.ppo_value_loss(values, batch["old_values"], batch["returns"], mask, ppo.vf_clip)
        loss = pol.loss + ppo.vf_coef * vloss
        metrics = {
            "tokens": int(mask.sum()),
            "policy_loss": pol.loss.item(),
            "value_loss": vloss.item(),
            "clip_frac": pol.clip_frac.item(),
            "approx_kl": pol.approx_kl.item(),
            "vf_clip_frac": vclip.item(),
            "ratio": pol.ratio_mean.item(),
            "kl_coef": self.kl_ctl.value,
            "entropy": L.masked_mean(L.entropy_from_logits(logits.detach(), ppo.temperature), mask).item(),
        }
        if ppo.ptx_coef:
            x = batch["ptx"]
            ptx_loss = model.loss(x[:, :-1], x[:, 1:])
            loss = loss + ppo.ptx_coef * ptx_loss
            metrics["ptx_loss"] = ptx_loss.item()
        return loss, metrics

    def save_stats(self, out_dir: Path) -> None:
        path = Path(out_dir) / "rollouts.jsonl"
        old = []
        if path.exists():  # keep earlier iterations of a resumed run
            old = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        seen = {s["iteration"] for s in self.stats}
        rows = [s for s in old if s["iteration"] not in seen] + self.stats
        rows.sort(key=lambda s: s["iteration"])
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def ptx_windows(tokens: torch.Tensor, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """`batch` random windows of seq_len + 1 tokens from a 1-D token tensor (deterministic in seed)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=g)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


def lora_policy_with_value(base) -> PolicyWithValue:
    """A PolicyWithValue made of a LoRA model's own modules (shared, not copied: training it
    trains `base`'s adapters) plus a zero-initialised value head that trains beside them."""
    from qkv.lora import train_head

    with torch.device("meta"):  # every module below is replaced by base's, so allocate nothing
        policy = PolicyWithValue(base.cfg)
    for name, child in base.named_children():
        setattr(policy, name, child)
    for name, buf in base.named_buffers(recurse=False):
        policy.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
    device = next(base.parameters()).device
    policy.value_head = torch.nn.Linear(base.cfg.d_model, 1, device=device)
    torch.nn.init.zeros_(policy.value_head.weight)
    torch.nn.init.zeros_(policy.value_head.bias)
    policy.lora_base_model = getattr(base, "lora_base_model", None)  # adapter_config.json's base model
    train_head(policy, "value_head")
    return policy.train(base.training)


def run_ppo(
    policy,
    ref_model,
    reward_model,
    tokenizer,
    prompts: list,
    train_cfg,
    ppo: PPOConfig,
    gold_fn: GoldFn | None = None,
    ptx_tokens: torch.Tensor | None = None,
    resume: bool = False,
    n_iterations: int | None = None,
):
    """Run PPO, training `policy` in place; returns (TrainResult, per-iteration stats). `policy`
    may be a plain Transformer (trained through a copy with a zero-initialised value head,
    whose language-model weights are copied back at the end; with LoRA adapters, through a
    PolicyWithValue sharing its modules, no copy) or a PolicyWithValue. train_cfg.max_steps is set
    from n_iterations when given (steps = iterations x ppo_epochs x minibatches)."""
    from qkv.align.policy import from_transformer
    from qkv.lora import has_lora
    from qkv.train import Trainer

    given, adapters = policy, has_lora(policy)
    if not isinstance(policy, PolicyWithValue):
        policy = lora_policy_with_value(policy) if adapters else from_transformer(PolicyWithValue, policy)
    run = PPORun(policy, ref_model, reward_model, tokenizer, prompts, ppo, train_cfg, gold_fn, ptx_tokens)
    spi = run.steps_per_iter
    updates = {"schedule": "constant", "warmup_steps": 0}
    if n_iterations is not None:
        updates["max_steps"] = n_iterations * spi
    if train_cfg.save_every and train_cfg.save_every % spi:
        updates["save_every"] = math.ceil(train_cfg.save_every / spi) * spi  # save at iteration boundaries
    if train_cfg.max_steps % spi and "max_steps" not in updates:
        updates["max_steps"] = math.ceil(train_cfg.max_steps / spi) * spi
    cfg = train_cfg.replace(**updates)
    run.cfg = cfg
    trainer = Trainer(
        policy, cfg, run.loss_fn, run.get_batch, tokenizer=tokenizer, extra_state=run.extra_state, resume=resume
    )
    if trainer.resumed_from is not None:
        state = json.loads((trainer.resumed_from / "trainer" / "state.json").read_text())
        run.kl_ctl.load_state_dict({"value": state["extra"].get("kl_coef", ppo.kl_coef)})
    trainer.on_step = lambda tr, step, m: run.save_stats(cfg.out_dir) if step % spi == 0 else None
    result = trainer.fit()
    run.save_stats(cfg.out_dir)
    if adapters:  # the result is the adapter + value head the trainer wrote; `given` shares the trained modules
        return result, run.stats
    # the top-level model is the policy alone (value head dropped), loadable by load_model
    from safetensors.torch import save

    from qkv.checkpoint import WEIGHTS
    from qkv.io import atomic_write_bytes

    sd = {k: v.detach().contiguous().cpu() for k, v in plain_state(policy).items()}
    atomic_write_bytes(Path(cfg.out_dir) / WEIGHTS, save(sd, metadata={"format": "qkv"}))
    if given is not policy:  # train in place, like the other stages
        given.load_state_dict(plain_state(policy))
    return result, run.stats
