"""Tokenizer training: byte-level BPE round-trips any Unicode string, special tokens and the
ChatML template behave, compression is measured on held-out text."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkv.tokenizer import BOS, DEFAULT_CHAT_TEMPLATE, EOS, IM_END, IM_START, Tokenizer, bytes_per_token, train_bpe

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 40 + "Grüße, 東京, naïve café — ok?\n" * 5


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe([TEXT], vocab_size=400)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_roundtrip_any_unicode(tok, s):
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64))
def test_roundtrip_any_utf8_of_bytes(tok, b):
    s = b.decode("utf-8", errors="replace")
    assert tok.decode(tok.encode(s)) == s


def test_vocab_and_special_tokens(tok):
    assert 260 < tok.vocab_size <= 400  # a corpus this small runs out of merges before 400
    ids = {t: tok.token_id(t) for t in (BOS, EOS, IM_START, IM_END)}
    assert None not in ids.values() and len(set(ids.values())) == 4
    assert tok.bos_token == BOS and tok.eos_token == EOS and tok.pad_id == tok.eos_id
    # special tokens are single ids, never split into bytes
    assert tok.encode(f"{IM_START}user")[0] == ids[IM_START]
    # merges were learned: frequent words are one token
    assert len(tok.encode("Citizen")) < len("Citizen")


def test_compression_on_held_out(tok):
    held_out = "Second Citizen:\nYou are all resolved? Speak, hear me.\n"
    bpt = bytes_per_token(tok, [held_out])
    assert 2.0 < bpt < 10  # learned merges compress well beyond 1 byte/token
    assert bytes_per_token(tok, ["xqzjv wqpk"]) < bpt  # unseen letter soup barely compresses
    assert bytes_per_token(tok, [held_out]) == pytest.approx(len(held_out.encode()) / len(tok.encode(held_out)))


def test_chat_template_and_assistant_mask(tok, tmp_path):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Speak."},
        {"role": "assistant", "content": "Speak, speak."},
    ]
    text = tok.render_chat(msgs)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nSpeak.<|im_end|>\n"
        "<|im_start|>assistant\nSpeak, speak.<|im_end|>\n"
    )
    assert tok.render_chat(msgs[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    ids, mask = tok.encode_chat(msgs)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Speak, speak.<|im_end|>\n"
    # saved in the HF layout and loaded back identically (also by transformers)
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.chat_template == DEFAULT_CHAT_TEMPLATE and back.encode(TEXT[:200]) == tok.encode(TEXT[:200])
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.apply_chat_template(msgs, tokenize=False) == text
    assert hf.encode("naïve café", add_special_tokens=False) == tok.encode("naïve café")


def test_vocab_too_small():
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["abc"], vocab_size=100)
