"""The native CPU linear kernel (qkv.kernels) against F.linear, and when it applies."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.kernels import cpu_linear, decode_attention, decode_ops, linear, linears, native

needs_native = pytest.mark.skipif(cpu_linear._linear.get() is None, reason="no AVX2 CPU or C compiler here")


# every SIMD path of the fp32 kernel this CPU runs: AVX2 everywhere, AVX-512 where it has it
SIMD_PATHS = ["avx2", "avx512"] if cpu_linear.simd_path() == "avx512" else ["avx2"]


@needs_native
@pytest.mark.parametrize("path", SIMD_PATHS)
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, cpu_linear.MAX_ROWS), n_in=st.integers(1, 70), n_out=st.integers(1, 40), bias=st.booleans())
def test_matches_f_linear(path, rows, n_in, n_out, bias):
    g = torch.Generator().manual_seed(rows * 10007 + n_in * 101 + n_out)
    x, w = torch.randn(rows, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    with torch.inference_mode(), cpu_linear.pinned_simd_path(path):
        assert cpu_linear.native_applies(x, [w], [b])
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@needs_native
def test_several_matrices_in_one_call():
    x = torch.randn(3, 40)
    ws = [torch.randn(n, 40) for n in (7, 2, 33)]
    bs = [torch.randn(7), None, torch.randn(33)]
    with torch.inference_mode():
        assert cpu_linear.native_applies(x, ws, bs)
        for got, w, b in zip(linears(x, ws, bs), ws, bs):
            torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@needs_native
def test_model_shapes_and_leading_dims():
    w = torch.randn(49152, 576)  # SmolLM2's tied head: 49152 = 3 * 16384 outputs
    x = torch.randn(2, 3, 576)
    with torch.inference_mode():
        y = linear(x, w)
    assert y.shape == (2, 3, 49152)
    torch.testing.assert_close(y, x @ w.T, atol=1e-4, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("path", SIMD_PATHS)
def test_a_row_gives_bitwise_the_same_output_in_any_batch(path):
    """Each output is summed in one fixed order, so batching never changes a request's logits:
    row counts with every remainder of the tiles, outputs not a multiple of a tile's, and an
    input length that ends in a partial vector."""
    w, b, x = torch.randn(100, 203), torch.randn(100), torch.randn(11, 203)
    with torch.inference_mode(), cpu_linear.pinned_simd_path(path):
        alone = torch.cat([linear(x[i : i + 1], w, b) for i in range(11)])
        for n in (2, 3, 4, 5, 6, 7, 9, 11):
            assert torch.equal(linear(x[:n], w, b), alone[:n])


@needs_native
def test_the_simd_paths_agree_and_pinning_is_undone():
    best = cpu_linear.simd_path()
    w, x = torch.randn(37, 91), torch.randn(6, 91)
    with torch.inference_mode():
        results = []
        for path in SIMD_PATHS:
            with cpu_linear.pinned_simd_path(path):
                assert cpu_linear.simd_path() == path
                results.append(linear(x, w))
        assert cpu_linear.simd_path() == best
        for y in results:
            torch.testing.assert_close(y, F.linear(x, w), atol=1e-5, rtol=1e-5)
    if best == "avx2":
        with pytest.raises(RuntimeError, match="cannot run the avx512 path"):
            with cpu_linear.pinned_simd_path("avx512"):
                pass


def test_falls_back_to_pytorch_where_it_does_not_apply():
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(2, 16)
    assert not cpu_linear.native_applies(x, [w])  # autograd needs PyTorch's op
    y = linear(x, w)
    y.sum().backward()
    assert w.grad is not None
    with torch.inference_mode():
        assert not cpu_linear.native_applies(x.double(), [w.double()])
        assert not cpu_linear.native_applies(x.bfloat16(), [w.bfloat16()])
        assert not cpu_linear.native_applies(torch.randn(cpu_linear.MAX_ROWS + 1, 16), [w])
        assert not cpu_linear.native_applies(x, [w.detach().t().contiguous().t()])  # strided weight
        torch.testing.assert_close(linear(x.double(), w.double()), F.linear(x.double(), w.double()))


def test_build_failure_is_a_warning_and_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_loaded", {})
    if not native.enabled():
        pytest.skip("native kernels are off on this CPU")
    with pytest.warns(UserWarning, match="linear_f32"):
        assert native.load("linear_f32") is None


def test_an_unwritable_cache_builds_in_a_private_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("QKV_CACHE", str(blocker))  # <file>/kernels cannot be created
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_warned_private", False)
    if not native.enabled():
        pytest.skip("native kernels are off on this CPU")
    with pytest.warns(UserWarning, match="not writable"):
        assert native.load("decode_ops_f32") is not None


def test_qkv_native_0_turns_kernels_off(monkeypatch):
    monkeypatch.setenv("QKV_NATIVE", "0")
    assert not native.enabled()


def _reference_decode(q, k_pool, v_pool, tables, total, scale, window):
    """Gather each row's keys/values token by token, then plain softmax attention."""
    B, H, _, D = q.shape
    _, bs, Hkv, _ = k_pool.shape
    out = torch.empty_like(q)
    for b in range(B):
        S = int(total[b])
        j = torch.arange(max(0, S - window) if window else 0, S)
        blocks = tables[b].long()[j // bs]
        k = k_pool[blocks, j % bs].transpose(0, 1).repeat_interleave(H // Hkv, 0)  # (H, S, D)
        v = v_pool[blocks, j % bs].transpose(0, 1).repeat_interleave(H // Hkv, 0)
        p = (q[b, :, 0, None, :] @ k.transpose(1, 2) * scale).softmax(-1)  # (H, 1, S)
        out[b, :, 0] = (p @ v)[:, 0]
    return out


@pytest.mark.skipif(decode_attention._attention.get() is None, reason="no AVX2 CPU or C compiler here")
@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 5),
    kv=st.sampled_from([(4, 4), (4, 2), (6, 1)]),
    D=st.sampled_from([8, 16, 64]),
    bs=st.sampled_from([1, 4, 16]),
    window=st.sampled_from([None, 3]),
    seed=st.integers(0, 10**6),
)
def test_paged_decode_matches_gathered_attention(B, kv, D, bs, window, seed):
    H, Hkv = kv
    g = torch.Generator().manual_seed(seed)
    num_blocks = 40
    k_pool, v_pool = torch.randn(2, num_blocks, bs, Hkv, D, generator=g)
    total = torch.randint(1, 5 * bs + 2, (B,), generator=g, dtype=torch.int32)
    max_blocks = int(-(-total.max() // bs))
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(B)]).to(torch.int32)
    q = torch.randn(B, H, 1, D, generator=g)
    with torch.inference_mode():
        assert decode_attention.applies(q, k_pool, v_pool)
        got = decode_attention.paged_decode(q, k_pool, v_pool, tables, total, 0.3, window)
    torch.testing.assert_close(
        got, _reference_decode(q, k_pool, v_pool, tables, total, 0.3, window), atol=1e-5, rtol=1e-5
    )


@pytest.mark.skipif(decode_ops._rms_norm.get() is None, reason="no AVX2 CPU or C compiler here")
@pytest.mark.parametrize("B,T,per_row_angles", [(1, 1, False), (3, 1, True), (2, 5, False), (4, 3, True)])
def test_decode_ops_match_the_model_pytorch_code(B, T, per_row_angles):
    from qkv.model.layers import RMSNorm
    from qkv.model.positions import apply_rope, rope_table

    x = torch.randn(B, T, 6, 16)
    cos_t, sin_t = rope_table(16, 64, 10000.0)
    pos = torch.randint(0, 64, (B, T)) if per_row_angles else torch.arange(7, 7 + T)[None]
    cos, sin = cos_t[pos].unsqueeze(2), sin_t[pos].unsqueeze(2)
    norm = RMSNorm(16)
    torch.nn.init.normal_(norm.weight)
    with torch.inference_mode():
        assert decode_ops.applies(x, cos, sin, rows=B * T)
        native_rope, native_norm = decode_ops.rope(x, cos, sin), decode_ops.rms_norm(x, norm.weight, norm.eps)
        reference_rope, reference_norm = apply_rope(x, cos, sin), norm(x)  # the model's PyTorch code
    torch.testing.assert_close(native_rope, reference_rope, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(native_norm, reference_norm, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(decode_attention._attention.get() is None, reason="no AVX2 CPU or C compiler here")
@pytest.mark.parametrize("B,H,Hkv", [(1, 4, 4), (3, 6, 2), (2, 4, 1)])
def test_dense_decode_matches_sdpa_on_a_cache_prefix(B, H, Hkv):
    cache_k, cache_v = torch.randn(2, 3, B, Hkv, 50, 16)  # (layers, B, Hkv, max_len, D) like KVCache
    k, v = cache_k[1, :, :, :37], cache_v[1, :, :, :37]
    q = torch.randn(B, H, 1, 16)
    with torch.inference_mode():
        assert decode_attention.applies(q, k, v)
        got = decode_attention.dense_decode(q, k, v, 0.25)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=H != Hkv)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_disabled_runs_pytorch_ops_only():
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with torch.inference_mode():
        with native.disabled():
            assert not cpu_linear.native_applies(x, [w])
            assert not decode_ops.applies(x, rows=2)
            torch.testing.assert_close(linear(x, w), F.linear(x, w))
        assert cpu_linear.native_applies(x, [w]) == native.enabled()
