"""Tests for lm.checkpoint: exact round trips, retention, crash leftovers, resharding."""

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lm import checkpoint as ckpt_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def _make_state(seed: int = 0) -> TrainState:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "dense": {
            "kernel": jax.random.normal(k1, (8, 16), jnp.float32),
            "bias": jax.random.normal(k2, (16,), jnp.bfloat16),
        },
        "embed": jax.random.normal(k3, (32, 8), jnp.float32),
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    # One real update so mu/nu/count are non-trivial.
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return TrainState(
        step=jnp.int32(7),
        params=params,
        opt_state=opt_state,
        rng=jax.random.key_data(jax.random.key(seed + 1)),
    )


def _assert_identical(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb  # same structure incl. optax NamedTuple types
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _on_mesh(tree, mesh):
    """Place every leaf: 2-D+ leaves split on dim 0 over all mesh devices, others replicated."""

    def put(x):
        n = mesh.devices.size
        spec = P("d") if x.ndim >= 1 and x.shape[0] % n == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)


def _mesh(n):
    return jax.make_mesh(
        (n,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices("cpu")[:n]
    )


def test_async_save_restore_bit_identical(tmp_path):
    state = _make_state()
    data_state = b'{"last_seen_indices": {"0": 41}, "last_worker_index": 0}'
    ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, save_every=10, async_save=True)
    assert ck.latest_step() is None
    assert ck.save(5, state, data_state) is False  # not a multiple of save_every
    assert ck.save(10, state, data_state, metadata={"config": "tiny"}) is True
    assert ck.save(10, state, data_state, force=True) is False  # already committed
    ck.wait()
    assert ck.latest_step() == 10
    assert (tmp_path / "checkpoints" / "10" / "state").is_dir()
    assert ck.read_metadata(10) == {"config": "tiny"}

    restored, restored_data = ck.restore(None, ckpt_lib.abstract_like(state))
    assert isinstance(restored, TrainState)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    _assert_identical(restored, state)
    assert restored_data == data_state and isinstance(restored_data, bytes)
    ck.close()

    # A fresh Checkpointer (e.g. after a restart) sees the same step.
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, save_every=10) as ck2:
        assert ck2.latest_step() == 10
        again, _ = ck2.restore(10, ckpt_lib.abstract_like(state))
        _assert_identical(again, state)


@pytest.mark.parametrize(
    "data_state",
    [
        {"next_index": 12, "epoch": 1, "nested": {"seed": [1, 2, 3]}},
        b"\xff\x00not utf8",
        None,
    ],
)
def test_data_state_round_trip(tmp_path, data_state):
    state = {"w": jnp.arange(4.0)}
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=1, save_every=1, async_save=False) as ck:
        ck.save(3, state, data_state)
        files = os.listdir(tmp_path / "checkpoints" / "3")
        assert ("data" in files) == (data_state is not None)
        if data_state is not None:
            # Per-process file, named like grain's own orbax handler names it.
            assert "process_0-of-1.json" in os.listdir(tmp_path / "checkpoints" / "3" / "data")
        _, got = ck.restore(3, ckpt_lib.abstract_like(state))
        assert got == data_state
        assert type(got) is type(data_state)
        assert ck.read_metadata() is None


def test_keep_last_n(tmp_path):
    state = {"w": jnp.zeros(3)}
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, save_every=5) as ck:
        for step in range(0, 21):
            ck.save(step, {"w": state["w"] + step}, {"i": step})
        ck.wait()
        assert ck.all_steps() == [15, 20]
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["15", "20"]
        got, data = ck.restore(15, ckpt_lib.abstract_like(state))
        np.testing.assert_array_equal(np.asarray(got["w"]), [15.0, 15.0, 15.0])
        assert data == {"i": 15}
        with pytest.raises(FileNotFoundError, match="step 5"):
            ck.restore(5, ckpt_lib.abstract_like(state))


def test_crashed_save_leftover_is_ignored_and_cleaned(tmp_path):
    state = {"w": jnp.ones(2)}
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ck:
        ck.save(4, state, None)
    # Simulate a save of step 8 that died before its commit rename.
    tmp = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234567890"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_text("partial")
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ck:
        assert ck.latest_step() == 4
        assert ck.all_steps() == [4]
        got, _ = ck.restore(None, ckpt_lib.abstract_like(state))
        np.testing.assert_array_equal(np.asarray(got["w"]), [1.0, 1.0])
        # The step can be saved for real afterwards; orbax finishes removing leftovers
        # (started in the background on open) before any new save.
        assert ck.save(8, state, None)
        ck.wait()
        assert not tmp.exists()
        assert ck.all_steps() == [4, 8]


def test_restore_onto_other_meshes_exact(tmp_path):
    if len(jax.devices("cpu")) < 8:
        pytest.skip("needs 8 CPU devices (conftest.py)")
    state = _make_state(3)
    mesh8, mesh1 = _mesh(8), _mesh(1)
    sharded = _on_mesh(state, mesh8)
    assert len(sharded.params["embed"].sharding.device_set) == 8
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=1, save_every=1) as ck:
        ck.save(1, sharded, {"pos": 1})
        ck.wait()
        for mesh in (mesh1, mesh8):
            target = ckpt_lib.abstract_like(_on_mesh(state, mesh))
            got, data = ck.restore(1, target)
            _assert_identical(got, state)
            assert data == {"pos": 1}
            for leaf, want in zip(jax.tree.leaves(got), jax.tree.leaves(target), strict=True):
                assert leaf.sharding == want.sharding


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.max_to_keep"):
        ckpt_lib.Checkpointer(tmp_path, max_to_keep=0, save_every=1)
    with pytest.raises(ValueError, match="checkpoint.save_every"):
        ckpt_lib.Checkpointer(tmp_path, max_to_keep=1, save_every=0)
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=1, save_every=1) as ck:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ck.restore(None, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_data_file_is_plain_json(tmp_path):
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=1, save_every=1, async_save=False) as ck:
        ck.save(2, {"w": jnp.ones(1)}, b'{"a": 1}')
    blob = json.loads((tmp_path / "checkpoints/2/data/process_0-of-1.json").read_text())
    assert blob == {"format": "utf8", "state": '{"a": 1}'}


def test_real_grain_iterator_resumes(tmp_path):
    grain = pytest.importorskip("grain.python")

    def loader():
        sampler = grain.IndexSampler(
            40, grain.ShardOptions(0, 1, drop_remainder=True), shuffle=True, num_epochs=1, seed=3
        )
        return grain.DataLoader(
            data_source=list(range(40)), sampler=sampler, operations=[grain.Batch(4)]
        )

    it = iter(loader())
    for _ in range(3):
        next(it)
    state = {"w": jnp.ones(2)}
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=1, save_every=3) as ck:
        ck.save(3, state, it.get_state())
    want = [next(it).tolist() for _ in range(3)]
    with ckpt_lib.Checkpointer(tmp_path, max_to_keep=1, save_every=3) as ck:
        _, data_state = ck.restore(None, ckpt_lib.abstract_like(state))
    resumed = iter(loader())
    resumed.set_state(data_state)
    assert [next(resumed).tolist() for _ in range(3)] == want
