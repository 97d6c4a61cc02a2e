"""Alignment: SFT, Bradley-Terry reward model, PPO-RLHF, DPO (and IPO/hinge/robust), GRPO,
the bundled task with a programmatic gold judge, and the alignment-tax report.

losses.py holds the math (tensor in, tensor out); policy.py the model-side pieces (token
log-probs, value/reward heads, rollouts through the engine); data.py the JSONL formats;
task.py the bundled task; sft/reward/ppo/dpo/grpo.py one stage each; report.py the study.
"""
