"""lm.models.matmul: bf16 weight matmuls with fp32 accumulation, forward and backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import train
from lm.models import matmul
from tests.test_train import losses, make_config

DIMS = (((2,), (0,)), ((), ()))  # x [B, L, D] . w [D, H, K]


def reference(x, w):
    return jnp.einsum("bld,dhk->blhk", x, w, precision="highest")


def test_bf16_dot_and_gradients_match_fp32_within_bf16_rounding():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    w = jax.random.normal(jax.random.key(1), (16, 3, 4)) / 4

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w).astype(jnp.float32)))

    mixed = lambda x, w: matmul.dot_general(x.astype(jnp.bfloat16), w, DIMS, jnp.bfloat16)  # noqa: E731
    y = mixed(x, w)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, 3, 4)
    np.testing.assert_allclose(y.astype(np.float32), reference(x, w), rtol=0.03, atol=0.03)
    (gx, gw), (rx, rw) = (jax.grad(loss(f), (0, 1))(x, w) for f in (mixed, reference))
    assert gw.dtype == jnp.float32  # the fp32 master weight gets an fp32 gradient
    for got, want in ((gx, rx), (gw, rw)):
        assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_fp32_is_plain_dot_general():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    w = jax.random.normal(jax.random.key(1), (16, 3, 4))
    got = matmul.dot_general(x, w, DIMS, jnp.float32)
    np.testing.assert_array_equal(got, jax.lax.dot_general(x, w, DIMS))


def test_unsupported_dimension_numbers_are_refused():
    with pytest.raises(ValueError, match="unsupported dimension numbers"):
        matmul.dot_general(jnp.ones((4, 3), jnp.bfloat16), jnp.ones((4, 5)),
                           (((0,), (0,)), ((), ())), jnp.bfloat16)


def test_bf16_training_follows_the_fp32_loss_curve(tmp_path):
    run = {"train.steps": 6, "train.log_every": 1, "train.eval_every": 6}
    train.train_and_evaluate(make_config(tmp_path, **run), str(tmp_path / "f32"))
    train.train_and_evaluate(make_config(tmp_path, **run, **{"model.dtype": "bfloat16"}),
                             str(tmp_path / "bf16"))
    f32, bf16 = losses(tmp_path / "f32"), losses(tmp_path / "bf16")
    assert sorted(bf16) == list(range(1, 7))
    for step in f32:
        assert abs(f32[step] - bf16[step]) < 0.02, (step, f32[step], bf16[step])
