"""qkv's GGUF reader against the `gguf` package's reader (the oracle): the same metadata, tensor
types, shapes, offsets and bytes; and one clear ValueError for every kind of damaged file."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from qkv.interop.gguf_file import GGUFFile


def write_sample(path: Path) -> None:
    """Every metadata value type, arrays of numbers and strings, and float and quantized tensors."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -3000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.strs", ["a", "", "ü ✓"])
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
    w.add_tensor("vec", rng.standard_normal(5).astype(np.float32))
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        x = rng.standard_normal((4, 64)).astype(np.float32)
        w.add_tensor(qtype.name.lower(), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def assert_same_as_gguf_reader(path: Path) -> None:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    assert ours.fields.keys() == {k for k in theirs.fields if not k.startswith("GGUF.")}
    for key, value in ours.fields.items():
        expected = theirs.fields[key].contents()
        if isinstance(value, float):
            assert value == pytest.approx(expected, rel=1e-7), key
        else:
            assert value == expected, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type, a.name
        assert list(a.shape) == [int(x) for x in b.shape], a.name
        assert (a.n_elements, a.n_bytes, a.data_offset) == (b.n_elements, b.n_bytes, b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name


def test_reads_what_the_gguf_package_reads(tmp_path):
    path = tmp_path / "sample.gguf"
    write_sample(path)
    assert_same_as_gguf_reader(path)


def test_reads_the_bundled_smollm2_file_as_the_gguf_package_does():
    from qkv.interop import bundled_smollm2

    path = bundled_smollm2()
    if path is None:
        pytest.skip("the bundled SmolLM2 GGUF is not installed (make install)")
    assert_same_as_gguf_reader(path)
    f = GGUFFile(path)
    assert len(f.fields["tokenizer.ggml.tokens"]) == 49152


def refuses(path: Path, data: bytes, match: str) -> None:
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        GGUFFile(path)


def test_every_truncation_is_one_clear_error(tmp_path):
    good = tmp_path / "good.gguf"
    write_sample(good)
    data = good.read_bytes()
    end = max(t.data_offset + t.n_bytes for t in GGUFFile(good).tensors)  # the rest is alignment padding
    bad = tmp_path / "bad.gguf"
    # cut inside the header, the metadata, the tensor infos and the tensor data
    for cut in sorted({3, 10, 30, 60, 200, 400, len(data) // 2, end - 150, end - 1}):
        refuses(bad, data[:cut], r"bad\.gguf: not a (readable )?GGUF file")


def header(n_tensors: int, n_fields: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_fields)


def kv_string(key: str) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode()


def test_sizes_in_the_file_are_not_trusted(tmp_path):
    p = tmp_path / "h.gguf"
    pad = b"\0" * 64
    refuses(p, b"GGML" + pad, "no GGUF magic")
    refuses(p, b"GGUF" + struct.pack("<I", 7) + pad, "version 7 is not supported")
    refuses(p, header(2**60, 0) + pad, "cannot fit")
    refuses(p, header(0, 2**62) + pad, "cannot fit")
    # a key whose length is far past the end of the file
    refuses(p, header(0, 1) + struct.pack("<Q", 2**50) + pad, "needs 1125899906842624 bytes")
    # an array declaring 2^40 uint32 elements / 2^40 strings
    arr = header(0, 1) + kv_string("k") + struct.pack("<IIQ", 9, 4, 2**40)
    refuses(p, arr + pad, "declares 1099511627776 elements")
    arr = header(0, 1) + kv_string("k") + struct.pack("<IIQ", 9, 8, 2**40)
    refuses(p, arr + pad, "declares 1099511627776 strings")
    refuses(p, header(0, 1) + kv_string("k") + struct.pack("<I", 99) + pad, "unknown value type 99")
    nested = header(0, 1) + kv_string("k") + struct.pack("<IIQ", 9, 9, 1)
    refuses(p, nested + pad, "array of arrays")
    # tensor infos: too many dimensions, an unknown type, a shape the type cannot hold
    t = header(1, 0) + kv_string("w")
    refuses(p, t + struct.pack("<I", 9) + pad, "has 9 dimensions")
    one_dim = t + struct.pack("<IQ", 1, 32)
    refuses(p, one_dim + struct.pack("<IQ", 250, 0) + pad, "unknown type 250")
    p.write_bytes(one_dim + struct.pack("<IQ", 8, 0) + b"\0" * 2000)  # one Q8_0 block of 32 reads...
    assert GGUFFile(p).tensors[0].n_bytes == 34
    odd = t + struct.pack("<IQ", 1, 33) + struct.pack("<IQ", 8, 0) + b"\0" * 2000
    refuses(p, odd, "Q8_0 blocks of 32 cannot hold")  # ...33 elements are not whole blocks
    huge = t + struct.pack("<IQQ", 2, 2**31, 2**31) + struct.pack("<IQ", 0, 0) + pad
    refuses(p, huge, "ends past the end of the file")


def test_duplicate_names_are_refused(tmp_path):
    p = tmp_path / "dup.gguf"
    info = kv_string("w") + struct.pack("<IQ", 1, 4) + struct.pack("<IQ", 0, 0)
    refuses(p, header(2, 0) + info + info + b"\0" * 64, "'w' appears twice")
    kv = kv_string("k") + struct.pack("<IB", 0, 1)
    refuses(p, header(0, 2) + kv + kv + b"\0" * 64, "'k' appears twice")
