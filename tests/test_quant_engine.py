"""Quantized weights through the serving engine: continuous batching, the fused decode block,
and a request's tokens independent of what it is batched with."""

from __future__ import annotations

import pytest
import torch

from _infer_fixtures import make_tokenizer, tiny_model
from qkv.infer import backend, fused_decode
from qkv.infer.engine import Engine
from qkv.infer.sampling import SamplingParams
from qkv.kernels import native
from qkv.quant import QuantEmbedding, QuantLinear, quantize_model


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_request_alone_or_batched_gives_the_same_tokens(qtype):
    model = quantize_model(tiny_model(d_model=64, n_head=4, n_kv_head=2), qtype)
    assert isinstance(model.blocks[0].mlp.down_proj, QuantLinear) and isinstance(model.tok_emb, QuantEmbedding)
    tok = make_tokenizer()
    prompts = [tok.encode(t) for t in ["To be, or not", "Now is the winter", "the slings and", "whether 'tis nobler"]]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)
    engine = Engine(model, tok, max_num_seqs=8, block_size=8)
    if native.enabled():
        view = fused_decode._current_view(model)
        assert backend.backend_of(model) == "native" and view is not None and len(view.blocks) == model.cfg.n_layer
    alone = [engine.generate([prompts[0]], p)[0][0].token_ids for p in (greedy, seeded)]
    batched = engine.generate(prompts + prompts[:1], [greedy, greedy, seeded, greedy, seeded])
    assert batched[0][0].token_ids == alone[0]
    assert batched[4][0].token_ids == alone[1]
    assert all(len(r[0].token_ids) == 24 for r in batched)


def test_quantized_engine_matches_the_modules_step_by_step():
    """The engine's fused, paged decode over quantized blocks gives the tokens that the model's
    own forward (QuantLinear modules, no cache) gives, greedy."""
    torch.manual_seed(0)
    model = quantize_model(tiny_model(d_model=64, n_head=4, n_kv_head=2), "q8_0")
    tok = make_tokenizer()
    prompt = tok.encode("Now is the winter of our discontent")
    got = Engine(model, tok).generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got[0][0].token_ids == ids[len(prompt) :]
