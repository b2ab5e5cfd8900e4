"""The fused output projection + cross-entropy equals the materialised one: values,
accuracy and gradients, for any chunking, with zero weights, in bf16, tied or untied."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.models.config import ModelConfig
from lm.models.transformer import Decoder
from lm.objectives.losses import fused_cross_entropy, token_cross_entropy


def _inputs(b=3, length=10, d=16, v=37, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(v, d)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32)
    weights = jnp.asarray(rng.random((b, length)) > 0.3, jnp.float32)
    return x, table, targets, weights


def _reference(x, table, targets, weights):
    logits = jnp.einsum("bld,vd->blv", x, table)
    return token_cross_entropy(logits, targets, weights)


@pytest.mark.parametrize("chunk", [0, 1, 7, 12, 30, 64])  # 12: a padded last chunk
def test_fused_equals_materialised_values_and_gradients(chunk):
    x, table, targets, weights = _inputs()
    ref = _reference(x, table, targets, weights)
    got = fused_cross_entropy(x, table, targets, weights, chunk)
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(got[name][0], ref[name][0], rtol=1e-6)
        np.testing.assert_allclose(got[name][1], ref[name][1])

    def mean_loss(fn):
        return lambda x, t: (lambda m: m["loss"][0] / m["loss"][1])(fn(x, t))

    want = jax.grad(mean_loss(lambda x, t: _reference(x, t, targets, weights)), (0, 1))(
        x, table)
    have = jax.grad(mean_loss(lambda x, t: fused_cross_entropy(x, t, targets, weights, chunk)),
                    (0, 1))(x, table)
    for a, b in zip(have, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # tokens with weight 0 get no gradient
    assert float(jnp.abs(have[0][weights == 0]).max()) == 0.0


def test_fused_gradient_flows_through_jit_and_second_use_of_the_table():
    """The table also feeds the embedding lookup (tied weights): both gradients add."""
    x, table, targets, weights = _inputs(seed=1)
    ids = targets

    def loss(table, fused):
        h = x + table[ids]
        m = (fused_cross_entropy(h, table, targets, weights, 8) if fused
             else _reference(h, table, targets, weights))
        return m["loss"][0] / m["loss"][1]

    want = jax.jit(jax.grad(lambda t: loss(t, False)))(table)
    have = jax.jit(jax.grad(lambda t: loss(t, True)))(table)
    np.testing.assert_allclose(have, want, atol=1e-6)


def test_fused_bf16_is_close_to_fp32():
    x, table, targets, weights = _inputs(b=4, length=16, d=32, v=101, seed=2)
    ref = fused_cross_entropy(x, table, targets, weights, 16)["loss"][0]
    low = fused_cross_entropy(x.astype(jnp.bfloat16), table.astype(jnp.bfloat16), targets,
                              weights, 16)["loss"][0]
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, ref, rtol=2e-2)
    g = jax.grad(lambda x: fused_cross_entropy(x, table.astype(jnp.bfloat16), targets, weights,
                                               16)["loss"][0])(x.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all())


@pytest.mark.parametrize("tie, scale", [(True, False), (True, True), (False, False)])
def test_decoder_output_table_reproduces_its_logits(tie, scale):
    cfg = ModelConfig(vocab_size=29, d_model=16, num_heads=2, num_layers=1, mlp_dim=32,
                      max_len=8, tie_embeddings=tie, scale_tied_logits=scale)
    model = Decoder(cfg)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 29, (2, 8)), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
    logits = model.apply({"params": params}, ids)
    hidden = model.apply({"params": params}, ids, return_hidden=True)
    table, factor = Decoder.output_table(cfg, params)
    np.testing.assert_allclose(jnp.einsum("bld,vd->blv", hidden * factor, table), logits,
                               atol=1e-5)


def test_label_smoothing_mixes_in_the_uniform_cross_entropy():
    logits = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]]))
    targets, weights = jnp.array([[0, 2]]), jnp.array([[1.0, 0.5]])
    eps = 0.1
    got_sum, count = token_cross_entropy(logits, targets, weights, accuracy=False,
                                         label_smoothing=eps)["loss"]
    logp = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    # (1 - eps) * -log p(target) + eps * mean over the vocabulary of -log p
    per_token = (1 - eps) * -logp[[0, 1], [0, 2]] + eps * -logp.mean(-1)
    np.testing.assert_allclose(float(got_sum), float((per_token * [1.0, 0.5]).sum()),
                               rtol=1e-6)
    assert float(count) == 1.5
    plain = token_cross_entropy(logits, targets, weights, accuracy=False)["loss"][0]
    np.testing.assert_allclose(float(plain), float((-logp[[0, 1], [0, 2]] * [1.0, 0.5]).sum()),
                               rtol=1e-6)
