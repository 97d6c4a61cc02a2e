"""`qkv info`: parameter and KV-cache arithmetic from configs alone."""

import json

from qkv.cli import main


def test_info_mixtral_from_config_alone(capsys):
    assert main(["info", "mixtral-8x7b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert round(info["params_total"] / 1e9, 1) == 46.7
    assert round(info["params_active"] / 1e9, 1) == 12.9
    # 2 * 32 layers * 8 kv heads * 128 dims * 2 bytes (bf16)
    assert info["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2


def test_info_table_and_context_total(capsys):
    assert main(["info", "tiny", "--dtype", "fp32", "--context", "256", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "KV cache per token (fp32)" in out and "4.00 MiB" in out  # 2*4*2*32*4 B * 256 * 8
    assert "CPU decode step" in out


def test_info_says_how_decode_runs_here(capsys, monkeypatch):
    from qkv.kernels import native

    assert main(["info", "mixtral-8x7b", "--json"]) == 0
    moe = json.loads(capsys.readouterr().out)["cpu_decode"]
    assert main(["info", "llama-100m", "--json"]) == 0
    llama = json.loads(capsys.readouterr().out)["cpu_decode"]
    if native.enabled():
        assert "one native call per block" in llama and "op by op" in moe
    monkeypatch.setenv("QKV_NATIVE", "0")
    assert main(["info", "llama-100m", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu_decode"].startswith("PyTorch ops")


def test_info_unknown_model_is_one_line_error(capsys):
    assert main(["info", "no-such-model"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a preset" in err
