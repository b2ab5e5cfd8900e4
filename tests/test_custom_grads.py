"""Hand-written backward passes (lm.models.custom_grads, the fused query/key/value
projection): the same values and gradients as autodiff of the plain expressions, the same
parameters as the modules they stand in for."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lm.models.attention as attention_lib
from lm.models import custom_grads
from lm.models.attention import Attention, _qkv_product
from lm.models.config import ModelConfig
from lm.models.custom_grads import gelu_tanh


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _grads(f, *args):
    """Gradients of a scalar that weights every output element differently."""
    def loss(*a):
        out = f(*a)
        return jnp.sum(jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape) * out)
    return jax.grad(loss, argnums=tuple(range(len(args))))(*args)


def test_gelu_tanh_matches_jax_and_its_gradient():
    x = _normal(0, (4096,), 4)
    ref = lambda v: jax.nn.gelu(v, approximate=True)  # noqa: E731
    np.testing.assert_allclose(gelu_tanh(x), ref(x), rtol=0, atol=2e-6)
    (g,), (g_ref,) = _grads(gelu_tanh, x), _grads(ref, x)
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5)
    # the clamp of the slope never binds: its extremes lie inside [-0.2, 1.2]
    slope = jax.vmap(jax.grad(gelu_tanh))(jnp.linspace(-6.0, 6.0, 120001))
    np.testing.assert_allclose([slope.min(), slope.max()], [-0.12899, 1.12899], atol=1e-4)
    _, vjp = jax.vjp(gelu_tanh, x)
    assert [r.shape for r in jax.tree.leaves(vjp)] == [x.shape]  # one residual


def test_qkv_product_matches_three_products():
    x = _normal(0, (2, 5, 8))
    kernels = [_normal(i, (8, n, 4)) for i, n in ((1, 4), (2, 2), (3, 2))]

    def three(x, *ws):
        return jnp.concatenate([jnp.einsum("bld,dnk->blnk", x, w) for w in ws], axis=2)

    def fused(x, *ws):
        return jnp.concatenate(_qkv_product(x, *ws), axis=2)

    np.testing.assert_allclose(fused(x, *kernels), three(x, *kernels), rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(fused, x, *kernels), _grads(three, x, *kernels), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_bias,kv_heads", [(False, 4), (True, 2)])
def test_fused_projection_has_the_separate_parameters_and_outputs(monkeypatch, use_bias,
                                                                  kv_heads):
    """On CPU self-attention projects q, k, v in one product; its parameters (names,
    shapes, logical axes, initial values) and outputs are those of the three DenseGeneral
    projections that other backends (and cross-attention) use."""
    cfg = ModelConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=4,
                      num_kv_heads=kv_heads, mlp_dim=32, max_len=8, use_bias=use_bias)
    x = _normal(0, (2, 8, 16))
    module = Attention(cfg)
    fused = module.init(jax.random.key(0), x, None)
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "gpu")
    separate = module.init(jax.random.key(0), x, None)
    assert jax.tree.structure(fused) == jax.tree.structure(separate)
    boxed = lambda v: hasattr(v, "names")  # noqa: E731
    names = lambda t: [v.names for v in jax.tree.leaves(t, is_leaf=boxed)]  # noqa: E731
    assert names(fused) == names(separate)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(separate), strict=True):
        np.testing.assert_array_equal(a, b)
    params = {"params": jax.tree.map(lambda v: v, separate["params"])}
    params["params"]["query"]["kernel"] = params["params"]["query"]["kernel"].replace_boxed(
        _normal(5, (16, 4, 4)))
    if use_bias:
        params["params"]["key"]["bias"] = params["params"]["key"]["bias"].replace_boxed(
            _normal(6, (kv_heads, 4)))
    want = module.apply(params, x, None)
    separate_dots = str(jax.make_jaxpr(module.apply)(params, x, None)).count("dot_general")
    monkeypatch.undo()
    monkeypatch.setenv("LM_CPU_KERNELS", "0")  # the attention core's two products stay
    got = module.apply(params, x, None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and on CPU it is one product: two projection products fewer than the separate path
    fused_dots = str(jax.make_jaxpr(module.apply)(params, x, None)).count("dot_general")
    assert fused_dots == separate_dots - 2


@pytest.mark.parametrize("d_in,d_out", [(8, 24), (24, 8)])  # each transposes the smaller side
def test_dense_product_matches_autodiff(d_in, d_out):
    from lm.models.custom_grads import dense_product

    x, w = _normal(0, (3, 5, d_in)), _normal(1, (d_in, d_out))
    np.testing.assert_allclose(dense_product(x, w), x @ w, rtol=1e-5, atol=1e-5)
    got, want = _grads(dense_product, x, w), _grads(lambda x, w: x @ w, x, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    gx, gw = jax.grad(lambda x, w: dense_product(x, w).astype(jnp.float32).sum(), (0, 1))(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert (gx.dtype, gw.dtype) == (jnp.bfloat16, jnp.bfloat16)


def test_dense_layer_uses_dense_product_on_cpu_only(monkeypatch):
    from lm.models.layers import Dense

    cfg = ModelConfig(vocab_size=11, d_model=8, num_layers=1, num_heads=2, mlp_dim=16,
                      max_len=8)
    layer, x = Dense(cfg, 16, ("embed", "mlp"), use_bias=False), _normal(0, (2, 3, 8))
    params = layer.init(jax.random.key(0), x)
    traced = lambda: str(jax.make_jaxpr(layer.apply)(params, x))  # noqa: E731
    assert "custom_vjp_call" in traced()
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "gpu")
    assert "custom_vjp_call" not in traced()
    np.testing.assert_allclose(layer.apply(params, x), x @ params["params"]["kernel"].unbox(),
                               rtol=1e-6)


def test_softmax_matches_jax_and_its_gradient_with_masked_rows():
    from lm.models.custom_grads import softmax

    logits = _normal(0, (2, 3, 5, 7), 3)
    # a fully masked row (attention's padding queries) and a partly masked one
    logits = logits.at[0, 0, 0].set(-1e30).at[1, 2, 3, :4].set(-1e30)
    ref = lambda v: jax.nn.softmax(v, axis=-1)  # noqa: E731
    np.testing.assert_allclose(softmax(logits), ref(logits), rtol=1e-6, atol=1e-7)
    (g,), (g_ref,) = _grads(softmax, logits), _grads(ref, logits)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(g)).all()
    _, vjp = jax.vjp(softmax, logits)
    assert [r.shape for r in jax.tree.leaves(vjp)] == [logits.shape]  # probabilities only


def test_attention_uses_the_softmax_on_cpu_only(monkeypatch):
    from lm.models.attention import dot_product_attention

    q, k, v = _normal(0, (2, 4, 2, 8)), _normal(1, (2, 4, 2, 8)), _normal(2, (2, 4, 2, 8))

    def traced():
        return str(jax.make_jaxpr(lambda q: dot_product_attention(q, k, v))(q))

    assert "custom_vjp_call" in traced()
    want = jax.grad(lambda q: dot_product_attention(q, k, v).sum())(q)
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "gpu")
    assert "custom_vjp_call" not in traced()
    np.testing.assert_allclose(jax.grad(lambda q: dot_product_attention(q, k, v).sum())(q),
                               want, rtol=1e-5, atol=1e-6)


def test_tied_product_matches_autodiff():
    from lm.models.custom_grads import tied_product

    x, table = _normal(0, (2, 3, 8)), _normal(1, (11, 8))
    ref = lambda x, t: jnp.einsum("bld,vd->blv", x, t)  # noqa: E731
    np.testing.assert_allclose(tied_product(x, table), ref(x, table), rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(tied_product, x, table), _grads(ref, x, table), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tied_logits_use_tied_product_on_cpu_in_fp32_only(monkeypatch):
    from lm.models.layers import tied_logits

    # more rows than lm.kernels.logits takes (decoding's few rows have their own kernel)
    x, table = _normal(0, (2, 17, 8)), _normal(1, (11, 8))  # 34 rows

    def traced(dtype):
        return str(jax.make_jaxpr(lambda x, t: tied_logits(x, t, dtype))(x, table))

    assert "custom_vjp_call" in traced(jnp.float32) and "lm_small_logits" not in traced(
        jnp.float32)
    assert "custom_vjp_call" not in traced(jnp.bfloat16)  # bf16 keeps fp32 accumulation
    want = tied_logits(x, table, jnp.float32)
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "gpu")
    assert "custom_vjp_call" not in traced(jnp.float32)
    np.testing.assert_allclose(tied_logits(x, table, jnp.float32), want, rtol=1e-6)


def test_forward_clamps_keep_values_and_nan():
    """The clamps that keep erf, tanh and the probabilities out of YNNPACK's dot fusions
    never bind and let NaN through (a NaN loss must stay visible)."""
    from lm.models.custom_grads import gelu, gelu_tanh, softmax

    x = jnp.linspace(-30.0, 30.0, 601).at[7].set(jnp.nan)
    finite = ~jnp.isnan(x)
    for ours, ref in ((gelu, lambda v: jax.nn.gelu(v, approximate=False)),
                      (gelu_tanh, lambda v: jax.nn.gelu(v, approximate=True)),
                      (softmax, lambda v: jax.nn.softmax(v, axis=-1))):
        got, want = jax.jit(ours)(x), ref(x)
        assert bool(jnp.isnan(got[7])), ours.__name__
        if ours is softmax:
            got, want = jax.jit(ours)(x[finite]), ref(x[finite])
        else:
            got, want = got[finite], want[finite]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=ours.__name__)


def _ops_in_ynn_dot_fusions(fn, *args) -> set[str]:
    """The HLO ops XLA:CPU put inside YNNPACK fusions that contain a product."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    ops: set[str] = set()
    for name in set(re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo)):
        body = re.search(r"^%" + re.escape(name) + r" .*?^}", hlo, re.M | re.S).group(0)
        found = set(re.findall(r"= \S+ ([a-z][\w\-]*)\(", body))
        ops |= found if "dot" in found else set()
    return ops - {"parameter", "bitcast"}


def test_forward_without_gradient_keeps_activations_out_of_ynnpack_products():
    """Without a gradient, the GELUs' and the softmax's elementwise ops stay out of the
    next product's YNNPACK fusion (where they ran 2-4x slower); autodiff-free jax.nn
    versions of the same functions are fused, so the check can fail."""
    from lm.models.custom_grads import gelu, gelu_tanh, softmax

    x, w1, w2 = _normal(0, (64, 32)), _normal(1, (32, 128)), _normal(2, (128, 32))
    s, v = _normal(3, (8, 64, 64)), _normal(4, (8, 64, 32))
    cases = [
        (gelu, lambda h: jax.nn.gelu(h, approximate=False), "mlp"),
        (gelu_tanh, lambda h: jax.nn.gelu(h, approximate=True), "mlp"),
        (softmax, lambda t: jax.nn.softmax(t, axis=-1), "attention"),
    ]
    for ours, plain, where in cases:
        def fused(fn, where=where):
            if where == "mlp":
                return _ops_in_ynn_dot_fusions(lambda x, a, b: fn(x @ a) @ b, x, w1, w2)
            return _ops_in_ynn_dot_fusions(
                lambda s, v: jnp.einsum("bls,bsk->blk", fn(s), v), s, v)
        if not fused(plain) - {"dot"}:
            pytest.skip(f"this XLA:CPU fuses none of jax.nn's {ours.__name__} into YNNPACK "
                        "products (the clamps may no longer be needed)")
        assert fused(ours) <= {"dot"}, (ours.__name__, fused(ours))


@pytest.mark.parametrize("bias_shape", [(24,), (3, 8)])  # Dense; a [heads, head_dim] bias
def test_add_bias_gradient_is_the_exact_token_sum_in_bf16(bias_shape):
    from lm.models.custom_grads import add_bias

    y = _normal(0, (4, 37, *bias_shape), 3.0).astype(jnp.bfloat16)
    bias = _normal(1, bias_shape).astype(jnp.bfloat16)
    weights = _normal(2, y.shape).astype(jnp.bfloat16)

    def loss(y, b, add):
        return jnp.sum((add(y, b) * weights).astype(jnp.float32))

    dy, db = jax.grad(loss, argnums=(0, 1))(y, bias, add_bias)
    dy_ref, _ = jax.grad(loss, argnums=(0, 1))(y, bias, lambda y, b: y + b)
    np.testing.assert_array_equal(add_bias(y, bias), y + bias)
    np.testing.assert_array_equal(dy, dy_ref)
    # the sum of the bf16 cotangents in fp32, rounded once to bf16 (XLA's own reduction
    # rounds partial sums to bf16 on the way and strays further from it)
    exact = np.asarray(weights, np.float64).reshape(-1, *bias_shape).sum(0)
    np.testing.assert_array_equal(db, jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16))
    assert db.dtype == jnp.bfloat16
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=1), static_argnums=2)(y, bias, add_bias))
    assert "dot_general" in jaxpr  # the product with ones (the loss itself has none)


@pytest.mark.parametrize("width", [16384, 16385])
def test_wide_fp32_bias_gradient_is_a_product_with_ones(width):
    """In fp32 only biases wider than `_WIDE_BIAS` (an output bias over a vocabulary) take
    the product with ones; narrower ones keep XLA's sum. Either way the gradient is the
    token sum (within fp32 rounding of a 40-term sum)."""
    from lm.models.custom_grads import _WIDE_BIAS, add_bias

    assert _WIDE_BIAS == 16384
    y, bias, weights = _normal(0, (5, 8, width)), _normal(1, (width,)), _normal(2, (5, 8, width))

    def loss(y, b):
        return jnp.sum(add_bias(y, b) * weights)

    db = jax.grad(loss, argnums=1)(y, bias)
    np.testing.assert_allclose(db, np.asarray(weights, np.float64).sum((0, 1)), rtol=1e-5,
                               atol=1e-5)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=1))(y, bias))
    assert ("dot_general" in jaxpr) == (width > _WIDE_BIAS)


@pytest.mark.parametrize("d_in,d_out", [(64, 256), (256, 64)])
def test_bf16_dense_and_qkv_products_keep_bf16_operands_with_fp32_results(d_in, d_out):
    """bf16 -> bf16 products run as fp32 GEMMs on upcast copies on XLA:CPU; the dense and
    fused q/k/v products ask for an fp32 result instead (forward and backward), with the
    same values: both accumulate in fp32 and round the result once."""
    rng = np.random.default_rng(d_in)
    x = jnp.asarray(rng.normal(size=(2, 8, d_in)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d_in, d_out)) * 0.1, jnp.bfloat16)
    kernels = [jnp.asarray(rng.normal(size=(d_in, 2, 16)) * 0.1, jnp.bfloat16)
               for _ in range(3)]

    def loss(x, w, *kernels):
        y = custom_grads.dense_product(x, w).astype(jnp.float32)
        qkv = _qkv_product(x, *kernels)
        return (y ** 2).sum() + sum((o.astype(jnp.float32) ** 3).sum() for o in qkv)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    text = jax.jit(grad).lower(x, w, *kernels).as_text()
    dots = re.findall(r"stablehlo.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> "
                      r"(tensor<[^>]*>)", text)
    assert len(dots) == 3 + 7  # dense: 1 forward, 2 backward; q/k/v: 1 forward, 6 backward
    for a, b, out in dots:
        assert "bf16" in a and "bf16" in b and "f32" in out, (a, b, out)
    # the values of plain bf16 products (XLA's fp32 GEMM on the same values, rounded once)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(custom_grads, "mixed_dot", lambda a, b, dims=None: jax.lax.dot_general(
            a, b, dims or (((a.ndim - 1,), (0,)), ((), ()))))
        m.setattr(attention_lib, "mixed_einsum", jnp.einsum)
        want = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, w, *kernels)
    for g, r in zip(jax.jit(grad)(x, w, *kernels), want, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   rtol=2 ** -7, atol=2e-2 * float(np.abs(r).max()))


@pytest.mark.parametrize("with_bias,dtype", [(True, jnp.float32), (False, jnp.float32),
                                             (True, jnp.bfloat16)])
def test_layer_norm_matches_autodiff(with_bias, dtype):
    """The closed-form LayerNorm backward equals autodiff of the textbook forward (inputs
    far from zero mean and unit variance, so every term of the formula matters); the
    input gradient keeps the input's dtype."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 5, 16)) * 3.0 + 1.5, dtype)
    scale = jnp.asarray(rng.normal(size=16), jnp.float32)
    bias = jnp.asarray(rng.normal(size=16), jnp.float32) if with_bias else None
    w = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)

    def textbook(x, scale, bias):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale
        return y if bias is None else y + bias

    def loss(fn):
        return lambda x, scale, bias: jnp.sum(fn(x, scale, bias) * w)

    ours = functools.partial(custom_grads.layer_norm, eps=1e-5)
    np.testing.assert_allclose(ours(x, scale, bias), textbook(x, scale, bias), rtol=1e-5,
                               atol=1e-5)
    argnums = (0, 1, 2) if with_bias else (0, 1)
    got = jax.grad(loss(ours), argnums)(x, scale, bias)
    want = jax.grad(loss(textbook), argnums)(x, scale, bias)
    assert got[0].dtype == dtype
    for g, r in zip(got, want, strict=True):
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   rtol=tol, atol=tol)
    _, vjp = jax.vjp(ours, x, scale, bias)  # residuals: y [.., D], rstd [.., 1], params
    assert sorted(r.size for r in jax.tree.leaves(vjp)) == sorted(
        [x.size, x.size // 16, 16] + ([16] if with_bias else []))
