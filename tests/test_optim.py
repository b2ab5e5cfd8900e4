"""Optimizer: schedule values at the boundaries and the weight-decay mask."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lm import optim

CFG = dict(lr=1e-3, end_lr=1e-4, warmup_steps=10, schedule="cosine")


@pytest.mark.parametrize("kind,mid", [("cosine", 5.5e-4), ("linear", 5.5e-4),
                                      ("constant", 1e-3)])
def test_schedules(kind, mid):
    s = optim.schedule({**CFG, "schedule": kind}, 110)
    # Update k uses the value at k + 1: the first update already has lr / warmup.
    np.testing.assert_allclose([float(s(0)), float(s(9))], [1e-4, 1e-3], rtol=1e-5)
    np.testing.assert_allclose(float(s(59)), mid, rtol=1e-4)
    end = 1e-3 if kind == "constant" else 1e-4
    np.testing.assert_allclose([float(s(109)), float(s(500))], [end, end], rtol=1e-5)
    zero = optim.schedule({**CFG, "schedule": kind, "end_lr": 0.0}, 110)
    assert min(float(zero(k)) for k in range(0, 200)) >= 0.0


def test_unknown_schedule_names_the_field():
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.schedule({**CFG, "schedule": "step"}, 10)


def test_weight_decay_mask():
    params = {"embedder": {"token": {"embedding": jnp.ones((5, 2))}},
              "layer_0": {"mlp": {"wi": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}},
                          "attention_norm": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
                          "attention": {"query": {"kernel": jnp.ones((2, 1, 2))}}}}
    mask = optim.decay_mask(params, decay_embeddings=False)
    assert mask["embedder"]["token"]["embedding"] is False
    assert mask["layer_0"]["mlp"]["wi"] == {"kernel": True, "bias": False}
    assert mask["layer_0"]["attention_norm"] == {"scale": False, "bias": False}
    assert mask["layer_0"]["attention"]["query"]["kernel"] is True
    assert optim.decay_mask(params, decay_embeddings=True)["embedder"]["token"]["embedding"]
