"""`qkv bench` (llama-bench's pp/tg tests) and `qkv perplexity` (llama-perplexity's windows)."""

from __future__ import annotations

import json
import math

import torch

from _infer_fixtures import TEXT, make_tokenizer, tiny_model, to_hf_llama
from qkv.checkpoint import save_model
from qkv.cli import main
from qkv.eval.perplexity import perplexity
from qkv.infer import speed


def test_perplexity_matches_transformers_loss_window_by_window():
    model = tiny_model(max_seq_len=64)
    tokens = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    got = perplexity(model, tokens, ctx=64)
    hf = to_hf_llama(model)
    total, n = 0.0, 0
    for s in range(0, 150, 64):  # windows of 64, 64 and 22 tokens; each scores all but its first
        ids = torch.tensor([tokens[s : s + 64]])
        with torch.no_grad():
            loss = hf(ids, labels=ids).loss  # mean over the window's shifted targets
        total += float(loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert got.tokens_scored == n == 147 and got.windows == 3
    assert math.isclose(got.ppl, math.exp(total / n), rel_tol=1e-4)
    assert got.ppl_stderr > 0


def test_decode_bytes_per_token_counts_each_weight_once():
    model = tiny_model()
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert speed.decode_bytes_per_token(model) == weights  # tied head: the embedding read in full
    untied = tiny_model(tie_embeddings=False)
    emb = untied.tok_emb.weight
    expected = sum(p.numel() * 4 for p in untied.parameters()) - emb.numel() * 4 + emb.shape[1] * 4
    assert speed.decode_bytes_per_token(untied) == expected
    per_kv_token = untied.cfg.kv_bytes_per_token(4)
    assert speed.decode_bytes_per_token(untied, context=10) == expected + 10 * per_kv_token


def test_bench_and_perplexity_commands(tmp_path, capsys):
    ckpt = save_model(tmp_path / "ckpt", tiny_model(), make_tokenizer())
    assert main(["bench", "--model", str(ckpt), "-p", "16", "-n", "8", "-r", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["test"] for r in rows] == ["pp16", "tg8"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert 0 < rows[1]["roofline_fraction"] and rows[1]["bytes_per_token"] > 0
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TEXT * 4))
    assert (
        main(["perplexity", "--model", str(ckpt), "--text", str(text), "--ctx", "32", "--json", "--no-progress"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] >= 2 and result["ppl"] > 1
    assert main(["perplexity", "--model", str(ckpt), "--text", str(tmp_path / "missing.txt")]) == 1
    assert "no such text file" in capsys.readouterr().err


def test_bf16_weights_halve_the_bytes_a_decode_step_reads(tmp_path, capsys):
    ckpt = save_model(tmp_path / "ckpt", tiny_model(), make_tokenizer())
    rows = {}
    for dtype in ("fp32", "bf16"):
        assert main(["bench", "--model", str(ckpt), "-p", "0", "-n", "4", "-r", "1", "--dtype", dtype, "--json"]) == 0
        rows[dtype] = json.loads(capsys.readouterr().out)[0]
    ratio = rows["bf16"]["bytes_per_token"] / rows["fp32"]["bytes_per_token"]
    assert 0.5 <= ratio < 0.52  # every projection and the embedding in 2 bytes; norms stay fp32


def test_bench_at_a_depth_and_perplexity_through_an_int8_cache(tmp_path, capsys):
    ckpt = save_model(tmp_path / "ckpt", tiny_model(), make_tokenizer())
    rows = {}
    for kv in ("fp32", "int8"):
        args = ["bench", "--model", str(ckpt), "-p", "0", "-n", "4", "-d", "40", "-r", "1", "--kv-dtype", kv]
        assert main([*args, "--json"]) == 0
        rows[kv] = json.loads(capsys.readouterr().out)[0]
    assert rows["int8"]["test"] == "tg4 @ d40" and rows["int8"]["kv_dtype"] == "int8"
    # the K/V of 42 tokens (the depth and half the steps): head_dim + 4 bytes a vector instead of 4 * head_dim
    cfg, weights = tiny_model().cfg, rows["fp32"]["bytes_per_token"] - 42 * tiny_model().cfg.kv_bytes_per_token(4)
    per_vector = 2 * cfg.n_layer * cfg.n_kv_head
    assert rows["int8"]["bytes_per_token"] == weights + 42 * per_vector * (cfg.head_dim + 4)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TEXT * 4))
    ppl = {}
    for kv in ("fp32", "int8"):
        args = ["perplexity", "--model", str(ckpt), "--text", str(text), "--ctx", "32", "--kv-dtype", kv]
        assert main([*args, "--json", "--no-progress"]) == 0
        ppl[kv] = json.loads(capsys.readouterr().out)["ppl"]
    assert ppl["int8"] != ppl["fp32"] and math.isclose(ppl["int8"], ppl["fp32"], rel_tol=0.01)
