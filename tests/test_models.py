"""Model library: attention against a float64 reference, masks, causality, KV cache,
scan/loop and remat equivalence, published parameter counts, logical axis names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lm.models import cache as cache_lib
from lm.models import masks as M
from lm.models.attention import cached_attention, dot_product_attention
from lm.models.config import ModelConfig
from lm.models.heads import BertPretrainer, SequenceClassifier
from lm.models.layers import Mlp
from lm.models.presets import PRESETS, preset
from lm.models.transformer import Decoder, Embedder, Encoder, EncoderDecoder, stack_layers

TINY = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=64)


# ------------------------------------------------------------------ attention
def reference_attention(q, k, v, allowed):
    """softmax(QKᵀ/√K)V in float64 NumPy, GQA by repeating key/value heads."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    logits = np.einsum("blhk,bshk->bhls", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(allowed, logits, -1e300)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhls,bshk->blhk", p, v)


def _masks(rng):
    b, length = 2, 12
    seg_pad = np.array([[1] * 12, [1] * 7 + [0] * 5])
    pos = np.tile(np.arange(length), (b, 1))
    packed = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 3 + [2] * 3 + [3] * 6])
    packed_pos = np.asarray(M.default_positions(jnp.asarray(packed)))
    prefix = M.prefix_from_lengths(jnp.array([4, 6]), jnp.asarray(pos))
    enc_seg = np.array([[1] * 9 + [0] * 3, [1] * 12])
    return {
        "padding": M.self_mask(jnp.asarray(seg_pad), jnp.asarray(pos), causal=False),
        "causal": M.self_mask(jnp.asarray(seg_pad), jnp.asarray(pos), causal=True),
        "packed": M.self_mask(jnp.asarray(packed), jnp.asarray(packed_pos), causal=True),
        "prefix": M.self_mask(jnp.asarray(seg_pad), jnp.asarray(pos), causal=True, prefix=prefix),
        "cross": M.cross_mask(
            jnp.asarray(seg_pad),
            jnp.asarray(enc_seg),
            jnp.asarray(pos),
            jnp.zeros_like(jnp.asarray(enc_seg)),
        ),
    }


@pytest.mark.parametrize("impl", ["einsum", "xla"])
@pytest.mark.parametrize("kind", ["padding", "causal", "packed", "prefix", "cross"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_float64_reference(impl, kind, kv_heads):
    rng = np.random.default_rng(hash((impl, kind, kv_heads)) % 2**32)
    mask = _masks(rng)[kind]
    b, length, h, k = 2, 12, 4, 8
    q = rng.normal(size=(b, length, h, k)).astype(np.float32)
    kk = rng.normal(size=(b, length, kv_heads, k)).astype(np.float32)
    v = rng.normal(size=(b, length, kv_heads, k)).astype(np.float32)
    out = dot_product_attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), mask, impl=impl)
    allowed = np.asarray(mask.allowed())
    ref = reference_attention(q, kk, v, allowed)
    rows = allowed.any(-1)[:, 0]  # queries with at least one visible key
    np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_gradients_match_autodiff_of_a_plain_reference(kv_heads):
    """Every logits layout (a key/value head per query head, groups of query heads, one
    key/value head for all) and the CPU softmax's backward give autodiff's gradients of a
    plain repeat-the-heads implementation, for the query, keys, values and a bias."""
    rng = np.random.default_rng(kv_heads)
    mask = _masks(rng)["packed"]
    q = jnp.asarray(rng.normal(size=(2, 12, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 12, kv_heads, 8)), jnp.float32) for _ in "kv")
    bias = jnp.asarray(rng.normal(size=(2, 4, 12, 12)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, 12, 4, 8)), jnp.float32)
    rows = jnp.asarray(mask.allowed().any(-1)[:, 0])[..., None, None]  # ignored rows out

    def reference(q, k, v, bias):
        rep = 4 // kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        logits = jnp.einsum("blhk,bshk->bhls", q, k) / jnp.sqrt(8.0) + bias
        probs = jax.nn.softmax(jnp.where(mask.allowed(), logits, -1e30), -1)
        return jnp.einsum("bhls,bshk->blhk", probs, v)

    def ours(q, k, v, bias):
        return dot_product_attention(q, k, v, mask, bias_BHLS=bias)

    def loss(fn, *args):
        return jnp.sum(jnp.where(rows, fn(*args) * cot, 0.0))

    got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2, 3))(q, k, v, bias)
    want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for name, a, b in zip(("q", "k", "v", "bias"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5,
                                   err_msg=name)
    assert float(jnp.abs(got[0]).sum()) > 0 and float(jnp.abs(got[3]).sum()) > 0


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_table_has_no_axis_of_size_one(kv_heads):
    """The logits, probabilities and their gradients carry no size-1 axis in any layout
    (XLA:CPU's reductions over [B, G, 1, L, S] ran 6-20x slower than over [B, H, L, S])."""
    rng = np.random.default_rng(0)
    mask = _masks(rng)["causal"]
    q = jnp.asarray(rng.normal(size=(2, 12, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 12, kv_heads, 8)), jnp.float32) for _ in "kv")
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda q, k, v: dot_product_attention(q, k, v, mask).sum(), argnums=(0, 1, 2)))(q, k, v)

    def shapes(jaxpr):  # every float value's shape, custom_vjp bodies included
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                if jnp.issubdtype(var.aval.dtype, jnp.floating):
                    yield var.aval.shape
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from shapes(sub)

    tables = [s for s in shapes(jaxpr.jaxpr) if s[-2:] == (12, 12)]
    assert tables and all(1 not in s for s in tables), tables


def test_attention_probabilities_are_returned_and_normalised():
    rng = np.random.default_rng(0)
    mask = _masks(rng)["causal"]
    q = jnp.asarray(rng.normal(size=(2, 12, 4, 8)), jnp.float32)
    _, probs = dot_product_attention(q, q, q, mask, return_probs=True)
    assert probs.shape == (2, 4, 12, 12)
    np.testing.assert_allclose(np.asarray(probs.sum(-1))[1, :, :7], 1.0, atol=1e-6)
    assert float(jnp.abs(jnp.triu(probs[0, 0], 1)).max()) == 0.0


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_unscaled_attention_is_scaled_attention_of_sqrt_k_times_the_query(impl):
    """scale=1 (T5): softmax(q·k) V, no 1/sqrt(K)."""
    rng = np.random.default_rng(1)
    mask = _masks(rng)["padding"]
    q, k, v = (rng.normal(size=(2, 12, 4, 8)).astype(np.float32) for _ in range(3))
    out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask,
                                impl=impl, scale=1.0)
    allowed = np.asarray(mask.allowed())
    ref = reference_attention(q * np.sqrt(8), k, v, allowed)
    rows = allowed.any(-1)[:, 0]
    np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], atol=2e-5, rtol=2e-5)


def test_scale_attention_false_folds_the_scale_into_the_query():
    """An EncoderDecoder without attention scaling computes the scaled model's function when
    its query kernels are the scaled model's times sqrt(K), and its query init is already
    1/sqrt(K) smaller (the logits start at the same size)."""
    cfg = TINY.replace(position="relative", norm="rmsnorm", use_bias=False,
                       scale_attention=False)
    rng = np.random.default_rng(6)
    src, tgt = (jnp.asarray(rng.integers(0, 61, (2, 9))) for _ in range(2))
    params = EncoderDecoder(cfg).init(jax.random.key(0), src, tgt)["params"]
    flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
    k = cfg.head_size
    queries = [p for p in flat if p.endswith("query/kernel")]
    assert len(queries) == 6  # encoder + decoder self + decoder cross
    ratio = np.std(flat["encoder/layer_0/attention/query/kernel"]) / np.std(
        flat["encoder/layer_0/attention/key/kernel"])
    assert abs(ratio * np.sqrt(k) - 1) < 0.1, ratio
    scaled = {p: v * np.sqrt(k) if p in queries else v for p, v in flat.items()}
    scaled = traverse_util.unflatten_dict(scaled, sep="/")
    ours = EncoderDecoder(cfg).apply({"params": params}, src, tgt)
    ref = EncoderDecoder(cfg.replace(scale_attention=True)).apply({"params": scaled}, src, tgt)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_geglu_tanh_is_tanh_gelu_gate_times_linear():
    cfg = TINY.replace(activation="geglu_tanh", use_bias=False)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 32)), jnp.float32)
    params = nn.unbox(Mlp(cfg).init(jax.random.key(0), x)["params"])
    p = {n: np.asarray(params[n]["kernel"]) for n in ("wi", "wi_up", "wo")}
    xs = np.asarray(x, np.float64)
    h = xs @ p["wi"]
    gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    want = (gelu * (xs @ p["wi_up"])) @ p["wo"]
    np.testing.assert_allclose(np.asarray(Mlp(cfg).apply({"params": params}, x)), want,
                               atol=1e-5, rtol=1e-5)
    assert cfg.gated and cfg.matmul_params_per_layer() == 4 * 32 * 32 + 3 * 32 * 64


# ---------------------------------------------------------------------- masks
def test_mask_truth_tables():
    seg = jnp.array([[1, 1, 1, 0]])
    pos = jnp.arange(4)[None]
    pad = np.asarray(M.self_mask(seg, pos, causal=False).allowed()[0, 0])
    np.testing.assert_array_equal(pad, [[1, 1, 1, 0]] * 3 + [[0, 0, 0, 0]])
    causal = np.asarray(M.self_mask(seg, pos, causal=True).allowed()[0, 0])
    np.testing.assert_array_equal(causal, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0] * 4])

    packed = jnp.array([[1, 1, 2, 2]])
    ppos = M.default_positions(packed)
    np.testing.assert_array_equal(np.asarray(ppos), [[0, 1, 0, 1]])
    table = np.asarray(M.self_mask(packed, ppos, causal=True).allowed()[0, 0])
    np.testing.assert_array_equal(table, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])

    ones = jnp.ones((1, 5), jnp.int32)
    p5 = jnp.arange(5)[None]
    prefix = M.prefix_from_lengths(jnp.array([2]), p5)
    table = np.asarray(M.self_mask(ones, p5, causal=True, prefix=prefix).allowed()[0, 0])
    np.testing.assert_array_equal(
        table, [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    )

    cross = M.cross_mask(
        jnp.array([[1, 1, 0]]),
        jnp.array([[1, 1, 1, 0]]),
        jnp.arange(3)[None],
        jnp.zeros((1, 4), jnp.int32),
    )
    np.testing.assert_array_equal(
        np.asarray(cross.allowed()[0, 0]), [[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        np.asarray(M.segments_from_lengths(jnp.array([2, 0]), 3)), [[1, 1, 0], [0, 0, 0]]
    )


# ------------------------------------------------------------------ causality
def _embed_grad(cfg, ids, segment_ids=None):
    """[L, L] matrix of max |d hidden[t] / d input_embedding[s]| (input s -> output t)."""
    model = Decoder(cfg)
    params = model.init(jax.random.key(0), ids)["params"]
    x0 = jax.random.normal(jax.random.key(1), (*ids.shape, cfg.d_model))
    w = jax.random.normal(jax.random.key(2), (cfg.d_model,))  # (a plain sum is ~0 after LN)

    def hidden_t(x, t):
        def feed_x(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(context.module, Embedder):
                return x
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(feed_x):
            h = model.apply({"params": params}, ids, segment_ids, return_hidden=True)
        return h[0, t] @ w

    rows = [jnp.abs(jax.grad(hidden_t)(x0, t)[0]).max(-1) for t in range(ids.shape[1])]
    return np.asarray(jnp.stack(rows))


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_decoder_is_causal_by_gradient(position):
    cfg = TINY.replace(position=position)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 61, (1, 10)))
    g = _embed_grad(cfg, ids)
    assert np.all(np.triu(g, 1) == 0.0), "output t depends on a later input"
    assert np.all(np.diag(g) > 0)


def test_packed_segments_do_not_influence_each_other():
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 61, (1, 10)))
    seg = jnp.array([[1] * 4 + [2] * 6])
    g = _embed_grad(TINY, ids, seg)
    assert np.all(g[4:, :4] == 0.0) and np.all(g[:4, 4:] == 0.0)
    assert np.all(g[4:, 4:][np.tril_indices(6)] > 0)


# ------------------------------------------------------------------- KV cache
def _decode_all(model_cls, cfg, params, ids, cache_len, prompt_len, **call):
    """Prompt in one call, then one token per call; returns the concatenated logits."""
    model = model_cls(cfg, decode=True, cache_len=cache_len) if model_cls is Decoder else None
    cache = model.init(jax.random.key(0), ids[:, :1], **call)["cache"]
    outs = []
    for start, stop in [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, ids.shape[1])]:
        pos = jnp.broadcast_to(jnp.arange(start, stop), (ids.shape[0], stop - start))
        logits, upd = model.apply(
            {"params": params, "cache": cache},
            ids[:, start:stop],
            None,
            pos,
            mutable=["cache"],
            **call,
        )
        cache = upd["cache"]
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize(
    "kv_heads,position", [(4, "learned"), (2, "rope"), (1, "rope"), (4, "relative")]
)
@pytest.mark.parametrize("scan", [False, True])
def test_decoder_kv_cache_matches_full_forward(kv_heads, position, scan):
    cfg = TINY.replace(num_kv_heads=kv_heads, position=position, scan_layers=scan)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 61, (2, 21)))
    params = Decoder(cfg).init(jax.random.key(1), ids)["params"]
    full = Decoder(cfg).apply({"params": params}, ids)
    inc = _decode_all(Decoder, cfg, params, ids, cache_len=32, prompt_len=5)
    np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads,position", [(4, "relative"), (2, "rope"), (4, "sinusoidal")])
def test_encoder_decoder_kv_cache_matches_full_forward(kv_heads, position):
    cfg = TINY.replace(
        num_kv_heads=kv_heads,
        position=position,
        norm="rmsnorm",
        use_bias=False,
        scale_tied_logits=True,
        num_decoder_layers=3,
    )
    rng = np.random.default_rng(4)
    src = jnp.asarray(rng.integers(0, 61, (2, 9)))
    src_seg = jnp.array([[1] * 9, [1] * 6 + [0] * 3])
    tgt = jnp.asarray(rng.integers(0, 61, (2, 20)))
    full_model = EncoderDecoder(cfg)
    params = full_model.init(jax.random.key(2), src, tgt)["params"]
    full = full_model.apply({"params": params}, src, tgt, input_segment_ids=src_seg)
    encoded = full_model.apply({"params": params}, src, src_seg, method=EncoderDecoder.encode)

    dec = EncoderDecoder(cfg, decode_mode=True, cache_len=24)
    cache = dec.init(jax.random.key(0), src, tgt[:, :1])["cache"]
    outs = []
    for start, stop in [(0, 4)] + [(t, t + 1) for t in range(4, 20)]:
        pos = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
        logits, upd = dec.apply(
            {"params": params, "cache": cache},
            encoded,
            tgt[:, start:stop],
            None,
            pos,
            encoder_segment_ids=src_seg,
            mutable=["cache"],
            method=EncoderDecoder.decode,
        )
        cache = upd["cache"]
        outs.append(logits)
    np.testing.assert_allclose(
        np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize("scale", [None, 1.0])
def test_cached_attention_equals_the_reference_attention(scale):
    """The decode step's attention on the stored [B*G, ...] cache = dot_product_attention
    on [B, S, G, K] views: grouped heads, padding, segments, causal order and a bias."""
    rng = np.random.default_rng(7)
    b, s, h, g, k = 3, 7, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, 1, h, k)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, s, g, k)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(b, s, g, k)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(1, h, 1, s)), jnp.float32)
    kv_seg = jnp.array([[1] * 7, [1] * 5 + [0] * 2, [2] * 3 + [1] * 4])
    kv_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = M.Mask(jnp.array([[1], [1], [1]]), kv_seg, jnp.array([[6], [4], [5]]), kv_pos,
                  causal=True)
    ck = keys.transpose(0, 2, 3, 1).reshape(b * g, k, s)
    cv = values.transpose(0, 2, 1, 3).reshape(b * g, s, k)
    got = cached_attention(q, ck, cv, mask, bias, scale)
    want = dot_product_attention(q, keys, values, mask, bias_BHLS=bias, scale=scale)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
    # row 2 attends to its own segment only (keys 3..5): key 6 is later, 0..2 segment 2
    probe = values.at[2, :3].set(100.0).at[2, 6].set(100.0)
    cv_probe = probe.transpose(0, 2, 1, 3).reshape(b * g, s, k)
    np.testing.assert_allclose(np.asarray(cached_attention(q, ck, cv_probe, mask, bias, scale)),
                               np.asarray(got), atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_cache_rows_split_merge_and_gather(scan):
    """split_rows/merge_rows are inverse views; gather_rows reorders every row-carrying
    leaf, so continuing from a gathered cache gives the gathered rows' logits."""
    cfg = TINY.replace(num_kv_heads=2, position="rope", scan_layers=scan)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 61, (3, 6)))
    params = Decoder(cfg).init(jax.random.key(1), ids)["params"]
    model = Decoder(cfg, decode=True, cache_len=8)
    cache = model.init(jax.random.key(0), ids[:, :1])["cache"]
    pos = jnp.broadcast_to(jnp.arange(5), (3, 5))
    _, upd = model.apply({"params": params, "cache": cache}, ids[:, :5], None, pos,
                         mutable=["cache"])
    cache = upd["cache"]
    split = cache_lib.split_rows(cache)
    shapes = {cache_lib.leaf_name(p): x.shape
              for p, x in jax.tree_util.tree_leaves_with_path(split)}
    assert shapes["cached_key"][-4:] == (3, 2, 8, 8) and shapes["segment_ids"] == (3, 8)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                     cache_lib.merge_rows(split), cache))

    def next_logits(cache, tok):
        out, _ = model.apply({"params": params, "cache": cache}, tok, None,
                             jnp.full((3, 1), 5), mutable=["cache"])
        return np.asarray(out[:, 0])

    order = jnp.array([2, 0, 0])
    tok = ids[:, 5:6]
    got = next_logits(cache_lib.gather_rows(cache, order), tok[order])
    np.testing.assert_allclose(got, next_logits(cache, tok)[np.asarray(order)], atol=1e-5)
    assert not np.allclose(got[0], got[1])  # the rows really differ


# -------------------------------------------------------- scan, loop and remat
@pytest.mark.parametrize("model_cls", [Decoder, Encoder])
def test_scan_equals_loop_and_remat_changes_nothing(model_cls):
    cfg = TINY.replace(num_layers=3, position="rope", num_kv_heads=2)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 61, (2, 16)))
    loop_params = nn.unbox(model_cls(cfg).init(jax.random.key(3), ids)["params"])
    scan_params = stack_layers(loop_params)
    assert scan_params["layers"]["attention"]["query"]["kernel"].shape == (3, 32, 4, 8)
    ref = model_cls(cfg).apply({"params": loop_params}, ids)

    def loss(params, c):
        return jnp.sum(model_cls(c).apply({"params": params}, ids) ** 2)

    ref_grad = jax.grad(loss)(loop_params, cfg)
    for scan, remat in [(True, "none"), (True, "full"), (False, "dots"), (True, "dots_no_batch")]:
        c = cfg.replace(scan_layers=scan, remat=remat)
        params = scan_params if scan else loop_params
        out = model_cls(c).apply({"params": params}, ids)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
        grad = jax.grad(loss)(params, c)
        want = stack_layers(ref_grad) if scan else ref_grad
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-3)


def test_scan_init_matches_loop_layout():
    cfg = TINY.replace(scan_layers=True)
    ids = jnp.ones((1, 4), jnp.int32)
    scan_shapes = jax.tree.map(jnp.shape, nn.unbox(Decoder(cfg).init(jax.random.key(0), ids)))
    loop = nn.unbox(Decoder(TINY).init(jax.random.key(0), ids))
    assert jax.tree.map(jnp.shape, stack_layers(loop)) == scan_shapes


# ------------------------------------------------------- presets and weights
def _count(model, *args) -> int:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))


@pytest.mark.parametrize(
    "name,expected",
    [
        ("bert_base", 109_482_240),
        ("bert_large", 335_141_888),
    ],
)
def test_bert_parameter_counts(name, expected):
    # BertModel = encoder + pooler; the 2-way classifier adds D*2 + 2.
    cfg = preset(name)
    total = _count(SequenceClassifier(cfg, 2), jnp.ones((1, 8), jnp.int32))
    assert total - (2 * cfg.d_model + 2) == expected


@pytest.mark.parametrize(
    "name,expected", [("gpt2_small", 124_439_808), ("gpt2_medium", 354_823_168)]
)
def test_gpt2_parameter_counts(name, expected):
    assert _count(Decoder(preset(name)), jnp.ones((1, 8), jnp.int32)) == expected


def test_t5_small_parameter_count():
    ids = jnp.ones((1, 8), jnp.int32)
    assert _count(EncoderDecoder(preset("t5_small")), ids, ids) == 60_506_624


def test_every_preset_builds_abstractly():
    ids = jnp.ones((1, 8), jnp.int32)
    for name in PRESETS:
        cfg = preset(name)
        model = (
            EncoderDecoder(cfg)
            if name.startswith("t5")
            else (Decoder(cfg) if not name.startswith("bert") else Encoder(cfg))
        )
        args = (ids, ids) if name.startswith("t5") else (ids,)
        assert _count(model, *args) > 0


def test_every_weight_has_logical_axis_names():
    ids = jnp.ones((1, 8), jnp.int32)
    pos = jnp.zeros((1, 2), jnp.int32)
    models = [
        (BertPretrainer(preset("bert_tiny")), (ids, pos)),
        (Decoder(TINY.replace(tie_embeddings=False, scan_layers=True)), (ids,)),
        (EncoderDecoder(preset("t5_small", num_layers=1, d_model=64, mlp_dim=64)), (ids, ids)),
        (Decoder(preset("llama_small", num_layers=1)), (ids,)),
    ]
    allowed = {
        "vocab",
        "embed",
        "mlp",
        "heads",
        "kv",
        "layers",
        "position",
        "segment",
        "classes",
        "relpos_buckets",
    }
    for model, args in models:
        boxed = jax.eval_shape(lambda m=model, a=args: m.init(jax.random.key(0), *a))["params"]
        leaves = jax.tree_util.tree_leaves_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )
        for path, leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), f"{path} has no axis names"
            assert len(leaf.names) == leaf.value.ndim, path
            assert set(leaf.names) <= allowed, (path, leaf.names)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="model.num_kv_heads"):
        TINY.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="model.activation"):
        TINY.replace(activation="swish")
    with pytest.raises(ValueError, match="model.nheads"):
        ModelConfig.from_dict({"nheads": 3})


def test_flops_per_token_matches_six_n_rule():
    cfg = preset("gpt2_small")
    n_nonembed = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    want = 6 * (n_nonembed + 768 * 50257) + 12 * 12 * 1024 * 768
    assert cfg.flops_per_token(1024) == want


def test_materialize_grad_is_an_exact_identity_in_both_directions():
    from lm.models.layers import materialize_grad

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(8, 8)), jnp.float32)

    def f(x, wrap):
        h = materialize_grad(x) if wrap else x
        return jnp.sum(jnp.tanh(h @ w) * x)

    np.testing.assert_array_equal(materialize_grad(x), x)
    np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: f(x, True)))(x),
                                  jax.jit(jax.grad(lambda x: f(x, False)))(x))
    # The barrier itself: the backward pass multiplies the cotangent by an identity.
    bwd = str(jax.make_jaxpr(jax.grad(lambda x: materialize_grad(x).sum()))(x))
    assert "dot_general" in bwd
    # An infinite cotangent becomes the largest finite value (the clamp that keeps the
    # product out of YNNPACK's fusions) instead of turning its column's other rows of
    # the identity product into NaN (0 * inf).
    c = jnp.ones_like(x).at[0, 0, 0].set(jnp.inf)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(materialize_grad(x) * c)))(x)
    want = np.ones(x.shape, np.float32)
    want[0, 0, 0] = np.finfo(np.float32).max
    np.testing.assert_array_equal(dx, want)


def test_gelu_matches_exact_gelu_and_its_gradient():
    from lm.models.layers import gelu

    x = jnp.asarray(np.random.default_rng(0).normal(size=(4096,)) * 4, jnp.float32)
    ref = lambda v: jax.nn.gelu(v, approximate=False)  # noqa: E731
    np.testing.assert_allclose(gelu(x), ref(x), rtol=0, atol=2e-6)
    np.testing.assert_allclose(jax.jit(gelu)(x), jax.jit(ref)(x), rtol=0, atol=2e-6)

    def loss(f, v):
        return jnp.sum(f(v) * jnp.cos(v))

    g, g_ref = jax.jit(jax.grad(lambda v: loss(gelu, v)))(x), jax.grad(lambda v: loss(ref, v))(x)
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=2e-6)
    # The slope at known points: gelu'(0) = 1/2, gelu'(x) -> 1 for large x, -> 0 for small.
    np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(jnp.array([0.0, 10.0, -10.0])),
                               [0.5, 1.0, 0.0], atol=1e-6)
    # The clamp in the backward pass never binds: the slope's extremes are inside it.
    dense = jnp.linspace(-4.0, 4.0, 80001)
    slope = jax.vmap(jax.grad(gelu))(dense)
    np.testing.assert_allclose([slope.min(), slope.max()], [-0.12890, 1.12890], atol=1e-4)
    # What it is for: the backward pass keeps one array, the slope (autodiff keeps three).
    _, vjp = jax.vjp(gelu, x)
    assert [r.shape for r in jax.tree.leaves(vjp)] == [x.shape]
    xb = x.astype(jnp.bfloat16)
    assert gelu(xb).dtype == jnp.bfloat16
    assert jax.grad(lambda v: gelu(v).astype(jnp.float32).sum())(xb).dtype == jnp.bfloat16


def test_scale_embeddings_multiplies_tokens_by_sqrt_width_before_positions():
    from lm.models.transformer import Embedder

    ids = jnp.arange(12).reshape(2, 6) % TINY.vocab_size
    pos = jnp.tile(jnp.arange(6), (2, 1))
    plain = Embedder(TINY.replace(position="sinusoidal"))
    scaled = Embedder(TINY.replace(position="sinusoidal", scale_embeddings=True))
    params = plain.init(jax.random.key(0), ids, pos)
    from lm.models import positions as pos_lib

    table = pos_lib.sinusoidal(pos, TINY.d_model)
    tokens = plain.apply(params, ids, pos) - table
    np.testing.assert_allclose(scaled.apply(params, ids, pos),
                               tokens * np.sqrt(TINY.d_model) + table, rtol=1e-6, atol=1e-6)
