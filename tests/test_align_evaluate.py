"""Measuring a policy runs its models in eval mode without autograd and leaves each model in
the mode it was in."""

import pytest
import torch

from _infer_fixtures import make_tokenizer, tiny_model
from qkv.align import evaluate as E

PROMPTS = ["To be, or not", "Now is the winter", "the slings and arrows"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def watch(model) -> list[tuple[bool, bool]]:
    """(training, grad enabled) at every forward of the model's first block."""
    seen: list[tuple[bool, bool]] = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append((m.training, torch.is_grad_enabled())))
    return seen


@pytest.mark.parametrize("training", [True, False])
def test_measurements_run_in_eval_mode_without_grad_and_restore_the_mode(tok, training):
    model = tiny_model(dropout=0.5).train(training)  # dropout: eval mode changes the numbers
    ref = tiny_model(dropout=0.5, seed=1).train(not training)
    seen = watch(model)
    ro, summary = E.judge_policy(model, tok, PROMPTS, lambda p, t: 0.5, max_new_tokens=6, seed=3)
    assert summary["gold"] == 0.5 and len(ro.texts) == len(PROMPTS)
    assert E.kl_to_reference(model, model, tok, ro) == 0.0  # the same model, no dropout noise
    assert E.kl_to_reference(model, ref, tok, ro) != 0.0
    ids = torch.tensor(tok.encode(" ".join(PROMPTS) * 8))
    a = E.text_loss(model, ids, seq_len=16, max_windows=4)["loss"]
    assert E.text_loss(model, ids, seq_len=16, max_windows=4)["loss"] == a  # deterministic: no dropout
    assert seen and set(seen) == {(False, False)}
    assert model.training is training and ref.training is (not training)
