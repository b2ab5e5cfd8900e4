"""The CPU attention kernel (lm/kernels): the same outputs and gradients as the XLA
einsum path for every mask kind and head layout, its inference form, rows without an
allowed key, the switch that turns it off, and its build cache."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.kernels import attention as kernel
from lm.kernels import build
from lm.models import masks
from lm.models.attention import dot_product_attention

pytestmark = pytest.mark.skipif(
    not (build.has_simd() and build.available()),
    reason="the CPU attention kernel needs AVX-512 or AVX2 and a C++ compiler here")


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _xla_path(fn):
    """`fn` traced with the kernel switched off (the einsum reference)."""
    def wrapped(*args):
        with build.switched_off():
            return fn(*args)
    return wrapped


def _mask(kind: str, b: int, length: int):
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    ones = jnp.ones((b, length), jnp.int32)
    if kind == "causal":
        return masks.self_mask(ones, pos, causal=True)
    if kind == "bidirectional_padding":  # BERT: row 1 is padded after 7 tokens
        seg = ones.at[1, 7:].set(0)
        return masks.self_mask(seg, pos, causal=False)
    if kind == "packed_causal":  # two documents in row 0, padding in row 1
        seg = ones.at[0, 9:].set(2).at[1, 11:].set(0)
        return masks.self_mask(seg, masks.default_positions(seg), causal=True)
    if kind == "prefix_lm":
        prefix = masks.prefix_from_lengths(jnp.array([5, 12]), pos)
        return masks.self_mask(ones, pos, causal=True, prefix=prefix)
    assert kind == "none"
    return None


CASES = [  # (mask kind, length, query heads, key/value heads, head size)
    ("causal", 64, 4, 4, 32),
    ("causal", 20, 4, 2, 8),  # grouped heads; L and K not multiples of 16
    ("bidirectional_padding", 24, 2, 1, 24),  # one key/value head for all
    ("packed_causal", 17, 3, 3, 16),
    ("prefix_lm", 33, 4, 1, 40),
    ("none", 16, 2, 2, 64),
    # K and L multiples of 16: the backward pass reading every row in place
    ("bidirectional_padding", 32, 4, 2, 16),  # grouped heads, padded rows
    ("packed_causal", 48, 4, 1, 32),  # one key/value head for four query heads
    ("prefix_lm", 16, 2, 2, 48),
]


@pytest.mark.parametrize("kind,length,heads,kv_heads,k", CASES)
def test_kernel_matches_the_einsum_path(kind, length, heads, kv_heads, k):
    b = 2
    q, key, v = (_normal(i, (b, length, h, k)) for i, h in enumerate((heads, kv_heads,
                                                                         kv_heads)))
    mask = _mask(kind, b, length)
    valid = jnp.ones((b, length), bool) if mask is None else mask.q_segment_ids != 0
    weights = _normal(9, (b, length, heads, k)) * valid[:, :, None, None]

    def loss(q, key, v):  # padded queries carry no loss, as in the models
        return jnp.sum(dot_product_attention(q, key, v, mask) * weights)

    assert kernel.usable(q, key, v)
    hlo = jax.jit(loss).lower(q, key, v).as_text()
    assert "lm_attention_fwd" in hlo or "lm_attention_inference" in hlo
    assert "lm_attention" not in jax.jit(_xla_path(loss)).lower(q, key, v).as_text()

    out = jax.jit(lambda *a: dot_product_attention(*a, mask))(q, key, v)
    ref = jax.jit(_xla_path(lambda *a: dot_product_attention(*a, mask)))(q, key, v)
    np.testing.assert_allclose(out * valid[:, :, None, None], ref * valid[:, :, None, None],
                               rtol=1e-5, atol=2e-6)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, key, v)
    refs = jax.jit(_xla_path(jax.grad(loss, argnums=(0, 1, 2))))(q, key, v)
    for g, r in zip(grads, refs, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=2e-6)
    # the training forward (probabilities saved) gives the inference forward's values
    train_out, _ = jax.vjp(jax.jit(lambda *a: dot_product_attention(*a, mask)), q, key, v)
    np.testing.assert_allclose(train_out, out, rtol=1e-6, atol=1e-7)



@pytest.mark.parametrize("kind,length,heads,kv_heads,k", CASES)
def test_packed_kernel_equals_the_kernel_on_the_three_parts(kind, length, heads, kv_heads, k):
    """Self-attention read in place from the packed projection [B, L, H + 2G, K]: the
    separate kernel's outputs exactly (same arithmetic), and a gradient that is the three
    parts' gradients side by side in the packed layout."""
    b = 2
    qkv = _normal(7, (b, length, heads + 2 * kv_heads, k))
    split = (heads, heads + kv_heads)
    mask = _mask(kind, b, length)
    allowed = jnp.ones((b, length, length), bool) if mask is None else mask.allowed()[:, 0]
    weights = _normal(9, (b, length, heads, k))
    scale = k ** -0.5

    def packed(x):
        return kernel.attention_packed(x, allowed, scale, heads)

    def separate(x):
        q, key, v = jnp.split(x, split, axis=2)
        return kernel.attention(q, key, v, allowed, scale)

    assert kernel.packed_usable(jnp.float32) and not kernel.packed_usable(jnp.bfloat16)
    np.testing.assert_array_equal(jax.jit(packed)(qkv), jax.jit(separate)(qkv))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(packed(x) * weights)))(qkv)
    ref = jax.jit(jax.grad(lambda x: jnp.sum(separate(x) * weights)))(qkv)
    np.testing.assert_array_equal(grad, ref)
    train_out, _ = jax.vjp(jax.jit(packed), qkv)  # probabilities saved: the same values
    np.testing.assert_array_equal(train_out, jax.jit(packed)(qkv))

@pytest.mark.parametrize("length,keys,k", [(18, 32, 16), (7, 16, 32), (21, 20, 8)])
def test_cross_attention_lengths_against_a_softmax_reference(length, keys, k):
    """L != S (a last, partial block of query rows; keys read in place or padded), grouped
    heads, a random mask with rows that allow no key: outputs and all three gradients."""
    b, heads, kv_heads = 2, 4, 2
    q = _normal(0, (b, length, heads, k))
    key, v = _normal(1, (b, keys, kv_heads, k)), _normal(2, (b, keys, kv_heads, k))
    allowed = jnp.asarray(np.random.default_rng(3).random((b, length, keys)) < 0.6)
    allowed = allowed.at[1, 2].set(False)
    weights = _normal(4, (b, length, heads, k))
    scale = k ** -0.5

    def reference(q, key, v):
        rep = heads // kv_heads
        kk, vv = jnp.repeat(key, rep, axis=2), jnp.repeat(v, rep, axis=2)
        logits = jnp.einsum("blhk,bshk->bhls", q, kk) * scale
        ok = allowed[:, None]
        p = jax.nn.softmax(jnp.where(ok, logits, -jnp.inf), axis=-1)
        p = jnp.where(ok.any(-1, keepdims=True), p, 0.0)
        return jnp.einsum("bhls,bshk->blhk", p, vv)

    def ours(q, key, v):
        return kernel.attention(q, key, v, allowed, scale)

    np.testing.assert_allclose(jax.jit(ours)(q, key, v), reference(q, key, v), rtol=1e-5,
                               atol=2e-6)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * weights), argnums=(0, 1, 2)))(
        q, key, v)
    refs = jax.grad(lambda *a: jnp.sum(reference(*a) * weights), argnums=(0, 1, 2))(q, key, v)
    for g, r in zip(grads, refs, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(grads[0][1, 2], 0.0)


@pytest.mark.parametrize("length,k", [(17, 16), (12, 16), (20, 32), (16, 16)])
def test_keys_past_the_end_are_never_read(length, k):
    """Batch row 1 is NaN and masked out entirely; row 0's keys padded up to a whole vector
    must not reach into it (0 x NaN would poison row 0): row 0's outputs and gradients
    equal those of row 0 alone, with the head width in place and the key count not."""
    b, heads = 2, 2
    qkv = _normal(0, (b, length, 3 * heads, k)).at[1].set(jnp.nan)
    allowed = jnp.tril(jnp.ones((length, length), bool))[None].repeat(b, 0).at[1].set(False)
    weights = _normal(1, (b, length, heads, k))

    def run(x, m):
        out = kernel.attention_packed(x, m, k ** -0.5, heads)
        grad = jax.grad(lambda y: jnp.sum(kernel.attention_packed(y, m, k ** -0.5, heads)
                                          * weights[: y.shape[0]]))(x)
        return out, grad

    out, grad = jax.jit(run)(qkv, allowed)
    alone_out, alone_grad = jax.jit(run)(qkv[:1], allowed[:1])
    np.testing.assert_array_equal(out[0], alone_out[0])
    np.testing.assert_array_equal(grad[0], alone_grad[0])
    np.testing.assert_array_equal(out[1], 0.0)
    q, key, v = jnp.split(qkv, [heads, 2 * heads], axis=2)
    sep = jax.jit(lambda *a: kernel.attention(*a, allowed, k ** -0.5))(q, key, v)
    np.testing.assert_array_equal(sep[0], alone_out[0])


def test_rows_without_an_allowed_key_are_zero_and_carry_no_gradient():
    b, length, h, k = 1, 16, 2, 16
    q, key, v = (_normal(i, (b, length, h, k)) for i in range(3))
    allowed = jnp.tril(jnp.ones((length, length), bool))[None].at[0, 3].set(False)
    out = kernel.attention(q, key, v, allowed, 0.25)
    np.testing.assert_array_equal(out[0, 3], 0.0)
    dq = jax.grad(lambda q: jnp.sum(kernel.attention(q, key, v, allowed, 0.25)))(q)
    np.testing.assert_array_equal(dq[0, 3], 0.0)
    assert np.isfinite(np.asarray(out)).all()


def test_switched_off_by_the_environment(monkeypatch):
    q = jnp.zeros((1, 4, 1, 8))
    assert kernel.usable(q, q, q)
    monkeypatch.setenv("LM_CPU_KERNELS", "0")
    assert not kernel.usable(q, q, q)
    monkeypatch.delenv("LM_CPU_KERNELS")
    half = q.astype(jnp.bfloat16)
    assert not kernel.usable(half, half, half)  # fp32 only: bf16 keeps the XLA path


def test_the_avx2_build_matches_the_einsum_path(tmp_path, monkeypatch):
    """The 8-float build (-march=haswell, AVX2 without AVX-512) runs on this CPU too."""
    if "avx512f" not in build.cpu_id().split():
        pytest.skip("the default build is already the AVX2 one on this CPU")
    monkeypatch.setenv("LM_KERNEL_MARCH", "haswell")
    import ctypes

    lib = ctypes.cdll.LoadLibrary(build.library_path(str(tmp_path)))
    jax.ffi.register_ffi_target("lm_attention_inference_avx2",
                                jax.ffi.pycapsule(lib.LmAttentionInference), platform="cpu")
    q, key, v = (_normal(i, (2, 20, 4, 24)) for i in range(3))
    mask = _mask("packed_causal", 2, 20)
    out = jax.ffi.ffi_call("lm_attention_inference_avx2", jax.ShapeDtypeStruct(q.shape,
                                                                               jnp.float32))(
        q, key, v, mask.allowed()[:, 0], scale=np.float32(24**-0.5))
    ref = _xla_path(lambda *a: dot_product_attention(*a, mask))(q, key, v)
    valid = (mask.q_segment_ids != 0)[:, :, None, None]
    np.testing.assert_allclose(out * valid, ref * valid, rtol=1e-5, atol=2e-6)
    assert lib.LmGemmBuilt() == 8  # the product in 8-float registers (decoding's rows)
    jax.ffi.register_ffi_target("lm_gemm_avx2", jax.ffi.pycapsule(lib.LmGemm), platform="cpu")
    jax.ffi.register_ffi_target("lm_gemm_acc_avx2", jax.ffi.pycapsule(lib.LmGemmAcc),
                                platform="cpu")
    a, b, c = _normal(6, (29, 40)), _normal(7, (40, 80)), _normal(8, (29, 80))
    a64, b64, c64 = (np.asarray(t, np.float64) for t in (a, b, c))
    for n in (29, 9):  # 6 x 16 tiles; FewRows' 64-column strip and tail
        got = jax.ffi.ffi_call("lm_gemm_avx2", jax.ShapeDtypeStruct((n, 80), jnp.float32))(
            a[:n], b)
        np.testing.assert_allclose(got, a64[:n] @ b64, rtol=1e-5, atol=1e-4)
    acc = jax.ffi.ffi_call("lm_gemm_acc_avx2", jax.ShapeDtypeStruct((29, 45), jnp.float32))(
        a, b[:, :45], c[:, :45])  # masked lanes: 45 = 5 x 8 + 5
    np.testing.assert_allclose(acc, c64[:, :45] + a64 @ b64[:, :45], rtol=1e-5, atol=1e-4)
    # the logits kernel's 8-float tiles (4 x 2, 2 x 4, 1 x 8) and its last < 8 table rows
    jax.ffi.register_ffi_target("lm_small_logits_avx2", jax.ffi.pycapsule(lib.LmSmallLogits),
                                platform="cpu")
    h, table = _normal(9, (7, 64)), _normal(10, (53, 64))
    logits = jax.ffi.ffi_call("lm_small_logits_avx2", jax.ShapeDtypeStruct((7, 53),
                                                                           jnp.float32))(h, table)
    np.testing.assert_allclose(logits, np.asarray(h, np.float64) @ np.asarray(table, np.float64).T,
                               rtol=1e-5, atol=1e-4)
    # the decoding kernel's 8-float form against the default build's
    jax.ffi.register_ffi_target("lm_decode_attention_avx2",
                                jax.ffi.pycapsule(lib.LmDecodeAttention), platform="cpu")
    qn, keys, values = _normal(3, (6, 2, 24)), _normal(4, (6, 24, 41)), _normal(5, (6, 41, 24))
    allowed = jnp.arange(41)[None] < jnp.array([[41], [30], [3]])
    got = jax.ffi.ffi_call("lm_decode_attention_avx2", jax.ShapeDtypeStruct(qn.shape,
                                                                            jnp.float32))(
        qn, keys, values, allowed, jnp.zeros((0,)), scale=np.float32(0.2))
    np.testing.assert_allclose(got, kernel.cached(qn, keys, values, allowed, 0.2), rtol=1e-5,
                               atol=1e-6)


def test_build_cache_and_a_failing_compiler(tmp_path, monkeypatch):
    path = build.library_path(str(tmp_path))
    assert os.path.dirname(path) == str(tmp_path) and os.path.getsize(path) > 0
    mtime = os.path.getmtime(path)
    assert build.library_path(str(tmp_path)) == path  # cached: not rebuilt
    assert os.path.getmtime(path) == mtime
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="failed on"):
        build.library_path(str(tmp_path / "other"))
    # no partial library or object files left behind (the builders' lock file stays)
    left = os.listdir(tmp_path / "other")
    assert len(left) == 1 and left[0].endswith(".so.lock"), left


def test_concurrent_builders_compile_once(tmp_path, monkeypatch):
    """Builders of one library (pytest workers, processes of a one-machine job) wait for
    the first: every source is compiled once, each in its own process, then linked once."""
    import threading

    log = tmp_path / "calls"
    fake = tmp_path / "fake-c++"  # records its calls; writes whatever -o names
    fake.write_text("#!/bin/sh\n"
                    'if [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\n'
                    f'echo "$*" >> {log}\n'
                    "sleep 0.2\n"
                    'while [ "$1" != -o ]; do shift; done; echo built > "$2"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(build.library_path(
        str(tmp_path / "cache")))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 3 and len(set(paths)) == 1
    assert open(paths[0]).read() == "built\n"
    calls = log.read_text().splitlines()
    compiled = sorted(c.split(" -c ")[1].split()[0] for c in calls if " -c " in c)
    assert compiled == sorted(build.sources())
    assert len([c for c in calls if c.startswith("-shared")]) == 1
    assert all("-march=native" in c and "-O3" in c for c in calls if " -c " in c)


def test_cross_attention_shapes_match_the_einsum_path():
    """Queries and keys of different lengths (decoder over encoder), key padding."""
    q = _normal(0, (2, 10, 4, 16))
    key, v = _normal(1, (2, 23, 2, 16)), _normal(2, (2, 23, 2, 16))
    q_seg = jnp.ones((2, 10), jnp.int32)
    kv_seg = jnp.ones((2, 23), jnp.int32).at[1, 15:].set(0)
    mask = masks.cross_mask(q_seg, kv_seg, jnp.broadcast_to(jnp.arange(10), (2, 10)),
                            jnp.broadcast_to(jnp.arange(23), (2, 23)))

    def loss(q, key, v):
        return jnp.sum(dot_product_attention(q, key, v, mask) * jnp.cos(q))

    assert "lm_attention" in jax.jit(loss).lower(q, key, v).as_text()
    np.testing.assert_allclose(jax.jit(loss)(q, key, v), jax.jit(_xla_path(loss))(q, key, v),
                               rtol=1e-5)
    for g, r in zip(jax.jit(jax.grad(loss, (0, 1, 2)))(q, key, v),
                    jax.jit(_xla_path(jax.grad(loss, (0, 1, 2))))(q, key, v), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("position,target", [("learned", "lm_attention_packed_fwd"),
                                             ("rope", "lm_attention_fwd")])
def test_self_attention_layer_takes_the_packed_kernel_without_rope(position, target):
    """An fp32 self-attention layer on the CPU runs the packed kernel (RoPE, applied
    between the projection and the kernel, the separate one); either way its output and
    parameter gradients equal the XLA path's."""
    from lm.models.attention import Attention
    from lm.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=11, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      mlp_dim=64, max_len=16, position=position, use_bias=True)
    x = _normal(0, (2, 16, 32))
    mask = _mask("packed_causal", 2, 16)
    module = Attention(cfg)
    params = module.init(jax.random.key(0), x, mask)
    weights = _normal(9, (2, 16, 32)) * (mask.q_segment_ids != 0)[:, :, None]

    def loss(params):
        return jnp.sum(module.apply(params, x, mask) * weights)

    hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
    assert target in hlo and ("lm_attention_packed" in hlo) == (position != "rope")
    grads = jax.jit(jax.grad(loss))(params)
    refs = jax.jit(_xla_path(jax.grad(loss)))(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(refs), strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(768, 128), (35, 13), (16, 8), (1, 5), (9, 1), (0, 4)])
def test_transpose_kernel_is_the_exact_transpose(shape):
    from lm.kernels import transpose as transpose_kernel

    x = _normal(0, shape)
    got = jax.jit(transpose_kernel.transpose)(x)
    assert got.shape == shape[::-1]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x).T)


@pytest.mark.parametrize("n,d_in,d_out", [(96, 16, 40), (96, 40, 16), (35, 13, 13)])
def test_weight_grad_transposes_through_the_kernel_for_ynnpack(n, d_in, d_out):
    """xᵀ g as the exact product, with the smaller operand transposed by the kernel (so
    XLA cannot fold it back into an Eigen product contracting both leading axes), and the
    dense layer's kernel gradient through it."""
    from lm.models import custom_grads

    x, g = _normal(1, (n, d_in)), _normal(2, (n, d_out))
    want = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
    np.testing.assert_allclose(jax.jit(custom_grads.weight_grad)(x, g), want, rtol=1e-5,
                               atol=1e-4)
    hlo = jax.jit(custom_grads.weight_grad).lower(x, g).compile().as_text()
    assert hlo.count('custom_call_target="lm_transpose"') == (1 if d_in <= d_out else 2)
    with build.switched_off():  # XLA's own form elsewhere, the same values
        off = jax.jit(lambda x, g: custom_grads.weight_grad(x, g)).lower(x, g).compile()
        assert "lm_transpose" not in off.as_text()
        np.testing.assert_allclose(off(x, g), want, rtol=1e-5, atol=1e-4)
    w = _normal(3, (d_in, d_out))
    dw = jax.grad(lambda w: jnp.sum(custom_grads.dense_product(x, w) * g))(w)
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-4)


def _gemm_or_skip():
    from lm.kernels import gemm

    if not gemm.usable(jnp.zeros((1, 16)), jnp.zeros((16, 16))):
        pytest.skip("the product kernel needs AVX-512 or AVX2")
    return gemm


# (N, K, F): row tails of every size below 12 (AVX2: 6), blocks of 48 rows (24), the
# column split of few row blocks (N < 8 * 48), F an odd multiple of 16, K = 1, one row,
# at most 12 rows (decoding: AVX2's FewRows, strips of 64 columns and their tail, rows
# 8, 4, 2 and 1 at a time)
@pytest.mark.parametrize("n,k,f", [(768, 128, 384), (13, 128, 48), (100, 33, 32),
                                   (37, 64, 1024), (1, 7, 16), (400, 1, 80), (11, 512, 128),
                                   (8, 256, 208), (3, 40, 80), (12, 96, 80), (7, 64, 1024)])
def test_gemm_kernel_is_the_product(n, k, f):
    gemm = _gemm_or_skip()
    a, b = _normal(1, (n, k)), _normal(2, (k, f))
    want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    got = jax.jit(gemm.matmul)(a, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))
    # leading axes are flattened and restored; every row is computed alike (bit for bit)
    np.testing.assert_array_equal(jax.jit(gemm.matmul)(a.reshape(1, n, k), b)[0], got)
    np.testing.assert_array_equal(jax.jit(gemm.matmul)(a[: (n + 1) // 2], b), got[: (n + 1) // 2])


@pytest.mark.parametrize("length", [5, 30])  # 10 rows (decoding's), 60
def test_dense_layer_products_run_in_the_gemm_kernel(monkeypatch, length):
    """dense_product's value and both gradients with the kernel (forward and x-gradient
    products in lm_gemm, the kernel gradient in XLA's product) equal XLA's path; not used
    for widths off the vector, other dtypes, explicit dimensions or with the switch off,
    nor with AVX2 for more than AVX2_MAX_ROWS rows."""
    gemm = _gemm_or_skip()
    from lm.models import custom_grads

    x, w, g = _normal(1, (2, length, 64)), _normal(2, (64, 96)), _normal(3, (2, length, 96))
    calls = 2 if gemm.built_width() == 16 or 2 * length <= gemm.AVX2_MAX_ROWS else 0

    def loss(x, w):
        return jnp.sum(custom_grads.dense_product(x, w) * g)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    hlo = fn.lower(x, w).compile().as_text()
    assert hlo.count('custom_call_target="lm_gemm"') == calls
    (value, (dx, dw)) = fn(x, w)
    x64, w64, g64 = (np.asarray(t, np.float64) for t in (x, w, g))
    np.testing.assert_allclose(value, np.sum((x64 @ w64) * g64), rtol=1e-5)
    np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, np.einsum("bni,bno->io", x64, g64), rtol=1e-5, atol=1e-4)
    assert not gemm.usable(x, _normal(4, (64, 40)))  # 40 columns: not a multiple of 16
    assert not gemm.usable(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    nt = (((2,), (1,)), ((), ()))
    assert "lm_gemm" not in jax.jit(lambda a, b: custom_grads.mixed_dot(a, b, nt)).lower(
        g, w).as_text()
    monkeypatch.setenv("LM_GEMM_KERNEL", "0")
    off = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    assert "lm_gemm" not in off.lower(x, w).as_text()
    np.testing.assert_allclose(off(x, w)[1][0], dx, rtol=1e-5, atol=1e-5)


# (N, K, F): rows in tiles of 12 and every tail, columns in 256-wide tasks with tails of
# 32, 16 and masked lanes (F % 16 = 1, 15), fewer than 16 columns, K = 1
@pytest.mark.parametrize("n,k,f", [(256, 512, 1297), (13, 64, 527), (5, 3, 15), (1, 1, 1),
                                   (25, 40, 256), (12, 17, 305)])
def test_accumulating_product_adds_into_c(n, k, f):
    gemm = _gemm_or_skip()
    a, b, c = _normal(1, (n, k)), _normal(2, (k, f)), _normal(3, (n, f))
    assert gemm.usable_acc(c, a, b) == (gemm.built_width() == 16)  # AVX2: XLA's sum
    want = np.asarray(c, np.float64) + np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    got = jax.jit(gemm.matmul_acc)(c, a, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))
    np.testing.assert_array_equal(c, _normal(3, (n, f)))  # the caller's c is untouched

    def summed(c, a_chunks, b_chunks):  # a loop's accumulator, updated in place
        def body(c, ab):
            return gemm.matmul_acc(c, *ab), None
        return jax.lax.scan(body, c, (a_chunks, b_chunks))[0]

    a3, b3 = _normal(4, (3, n, k)), _normal(5, (3, k, f))
    want3 = np.asarray(c, np.float64) + np.einsum("cnk,ckf->nf", np.asarray(a3, np.float64),
                                                  np.asarray(b3, np.float64))
    np.testing.assert_allclose(jax.jit(summed)(c, a3, b3), want3, rtol=1e-5,
                               atol=2e-4 * np.sqrt(k))


def test_the_fused_loss_adds_its_table_gradient_in_the_kernel(monkeypatch):
    """The fused cross-entropy's table gradient (summed over chunks) in lm_gemm_acc equals
    XLA's sum; the switch and bf16 keep XLA's."""
    gemm = _gemm_or_skip()
    if gemm.built_width() != 16:
        pytest.skip("the fused loss adds its table gradient in the kernel on AVX-512 only")
    from lm.objectives import losses

    x, table = _normal(1, (4, 24, 32)), _normal(2, (2101, 32))  # the kernel's vocabularies
    targets = jnp.asarray(np.random.default_rng(3).integers(0, 2101, (4, 24)))
    weights = jnp.ones((4, 24))

    def grads(chunk=32):  # 3 chunks of 8 positions
        fn = jax.jit(jax.grad(lambda x, t: losses.fused_cross_entropy(
            x, t, targets, weights, chunk=chunk)["loss"][0], argnums=(0, 1)))
        return fn.lower(x, table).as_text(), fn(x, table)

    text, (dx, dtable) = grads()
    assert text.count("lm_gemm_acc") == 1
    assert "lm_gemm_acc" not in grads(chunk=0)[0]  # one chunk: XLA's product alone
    monkeypatch.setenv("LM_GEMM_KERNEL", "0")
    text_off, (dx_off, dtable_off) = grads()
    assert "lm_gemm_acc" not in text_off
    np.testing.assert_allclose(dtable, dtable_off, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_off, rtol=1e-5, atol=1e-6)
