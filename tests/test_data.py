"""Corpus loading, deterministic split, shards (dtype, index, memmap) and the deterministic loader."""

import numpy as np
import pytest

from qkv.data.corpus import Document, load_documents, shakespeare_dir, split_documents
from qkv.data.loader import WindowSampler
from qkv.data.prepare import prepare
from qkv.data.shards import TokenShards, read_index, shard_dtype, unigram_entropy
from qkv.tokenizer import Tokenizer

LINES = [
    f"Line {i}: the quick brown fox {'jumps' if i % 3 else 'sleeps'} over dog number {i % 17}.\n" for i in range(400)
]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "text.txt"
    p.write_text("".join(LINES))
    return p


@pytest.fixture(scope="module")
def prepared(corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    index = prepare(str(corpus_file), out, vocab_size=300, val_frac=0.2, log=lambda s: None)
    return out, index


def test_bundled_corpus_is_found():
    folder = shakespeare_dir()
    plays = sorted(folder.glob("*_gut.txt"))
    assert len(plays) >= 30
    docs = load_documents("shakespeare")
    assert len(docs) == len(plays) and not any(d.name.endswith("_f") for d in docs)
    assert sum(len(d.text) for d in docs) > 4_000_000


def test_sources_txt_folder_jsonl(tmp_path, corpus_file):
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "a.txt").write_text("alpha")
    (tmp_path / "dir" / "sub" / "b.txt").write_text("beta")
    assert [d.text for d in load_documents(str(tmp_path / "dir"))] == ["alpha", "beta"]
    (tmp_path / "x.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert [d.text for d in load_documents(str(tmp_path / "x.jsonl"))] == ["one", "two"]
    (tmp_path / "y.jsonl").write_text('{"body": "one"}\n')
    with pytest.raises(ValueError, match="y.jsonl:1: .*'text'"):
        load_documents(str(tmp_path / "y.jsonl"))
    assert load_documents(str(corpus_file))[0].text == "".join(LINES)


def test_split_is_deterministic_and_disjoint():
    docs = [Document(f"d{i}", f"document number {i} " * 5) for i in range(30)]
    train, val = split_documents(docs, 0.1)
    train2, val2 = split_documents(list(reversed(docs)), 0.1)  # order does not matter
    assert sorted(d.name for d in val) == sorted(d.name for d in val2) and len(val) == 3
    assert not {d.name for d in train} & {d.name for d in val}
    # few documents: each one's tail is held out, at a line boundary
    t, v = split_documents([Document("a", "".join(LINES))], 0.1)
    assert t[0].text + v[0].text == "".join(LINES) and t[0].text.endswith("\n")


def test_prepare_writes_shards_and_index(prepared):
    out, index = prepared
    assert index["dtype"] == "uint16" and index["vocab_size"] <= 300
    tok = Tokenizer.load(out)
    train = TokenShards(out, "train")
    arr = np.concatenate(train.arrays)
    assert len(arr) == index["splits"]["train"]["tokens"] and arr.max() < index["vocab_size"]
    # the shard is the tokenized text followed by end-of-text
    assert (
        arr[-1] == tok.eos_id
        and tok.decode(arr[:-1].tolist())
        == "".join(LINES[: len(LINES) * 8 // 10 + 1])[: len(tok.decode(arr[:-1].tolist()))]
    )
    assert index["bytes_per_token"] > 1.5
    counts = np.bincount(arr, minlength=index["vocab_size"])
    assert index["unigram_entropy"] == pytest.approx(unigram_entropy(counts))


def test_loader_deterministic_and_rank_slices(prepared):
    out, _ = prepared
    s = WindowSampler(TokenShards(out, "train"), seq_len=16, seed=3)
    a, b = s.batch(5, 0, 8), s.batch(5, 0, 8)
    assert a["x"].equal(b["x"]) and a["x"].shape == (8, 16) and a["y"][:, :-1].equal(a["x"][:, 1:])
    assert not s.batch(6, 0, 8)["x"].equal(a["x"])
    assert not WindowSampler(TokenShards(out, "train"), 16, seed=4).batch(5, 0, 8)["x"].equal(a["x"])
    halves = [s.batch(5, 0, 8, rank=r, world=2)["x"] for r in range(2)]
    import torch

    assert torch.cat(halves).equal(a["x"])


def test_shard_dtype():
    assert shard_dtype(65536) == np.uint16 and shard_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="does not fit in uint16"):
        shard_dtype(70000, "uint16")


def test_bad_inputs_one_line_errors_nothing_overwritten(tmp_path, corpus_file, prepared):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="corpus is empty"):
        prepare(str(tmp_path / "empty.txt"), tmp_path / "o1", vocab_size=300, log=lambda s: None)
    assert not (tmp_path / "o1").exists()
    with pytest.raises(ValueError, match="does not fit in uint16"):
        prepare(str(corpus_file), tmp_path / "o2", vocab_size=70000, dtype="uint16", log=lambda s: None)
    assert not (tmp_path / "o2").exists()
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare(str(tmp_path / "missing.txt"), tmp_path / "o3", log=lambda s: None)
    with pytest.raises(FileNotFoundError, match="no such data directory"):
        read_index(tmp_path / "nope")
    out, index = prepared
    before = (out / "index.json").read_bytes()
    with pytest.raises(ValueError, match="already holds prepared data"):
        prepare(str(corpus_file), out, vocab_size=300, log=lambda s: None)
    assert (out / "index.json").read_bytes() == before
    # a truncated shard is caught when opened
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / index["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        TokenShards(bad, "train")


def test_prepare_cli_errors(tmp_path, capsys):
    from qkv.cli import main

    (tmp_path / "empty.txt").write_text("")
    assert main(["prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "corpus is empty" in err
