"""Tests for lm.sharding on 8 fake CPU devices (see conftest.py)."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lm import sharding  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _on_8_cpu_devices():
    """Run on the 8 fake CPU devices, also on a machine whose default backend is a GPU."""
    cpus = jax.devices("cpu")
    if len(cpus) != 8:
        pytest.skip(f"needs 8 CPU devices, jax was initialised with {len(cpus)}")
    with jax.default_device(cpus[0]):
        yield


def _mesh(data, fsdp, tensor, n=8):
    return sharding.make_mesh(data, fsdp, tensor, devices=jax.devices("cpu")[:n])


def test_make_mesh_default_devices():
    if jax.device_count() != 8:
        pytest.skip("default backend is not the 8-device CPU platform")
    mesh = sharding.make_mesh(-1, 2, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(mesh.devices.flat) == set(jax.devices())


def test_make_mesh_infers_minus_one():
    mesh = _mesh(-1, 2, 1)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    mesh = _mesh(1, 2, -1)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}


def test_make_mesh_explicit_devices():
    mesh = _mesh(1, 1, 1, n=1)
    assert mesh.devices.size == 1
    mesh = _mesh(2, -1, 1, n=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize(
    "sizes, pattern",
    [
        ((2, 2, 1), r"mesh.data=2, mesh.fsdp=2, mesh.tensor=1.*4 devices but 8"),
        ((4, 4, 1), r"16 devices but 8"),
        ((-1, -1, 1), r"at most one mesh axis may be -1"),
        ((-1, 3, 1), r"mesh.fsdp=3.*does not divide the device count 8"),
        ((0, 8, 1), r"positive or -1"),
    ],
)
def test_make_mesh_bad_shapes(sizes, pattern):
    with pytest.raises(ValueError, match=pattern):
        _mesh(*sizes)


def test_every_preset_names_every_axis():
    for name, rules in sharding.RULES.items():
        assert [k for k, _ in rules] == list(sharding.LOGICAL_AXES), name
    with pytest.raises(ValueError, match="mesh.rules='zero'"):
        sharding.get_rules("zero")


class _Tiny(nn.Module):
    """Boxed params with the logical names the real models use."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.02)
        emb = self.param(
            "embedding", nn.with_logical_partitioning(init, ("vocab", "embed")), (32, 16)
        )
        wi = self.param("wi", nn.with_logical_partitioning(init, ("embed", "mlp")), (16, 64))
        qkv = self.param(
            "q", nn.with_logical_partitioning(init, ("embed", "heads", "kv")), (16, 4, 4)
        )
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (16,)
        )
        bias = self.param("bias", nn.initializers.zeros, (64,))  # unannotated
        h = emb[x] * scale
        return (h @ wi + bias).sum() + jnp.einsum("bld,dhk->blhk", h, qkv).sum()


GOLDEN = {
    "dp": {
        "embedding": P(None, None),
        "wi": P(None, None),
        "q": P(None, None, None),
        "scale": P(None),
        "bias": P(),
    },
    "fsdp": {
        "embedding": P(None, "fsdp"),
        "wi": P("fsdp", None),
        "q": P("fsdp", None, None),
        "scale": P(None),
        "bias": P(),
    },
    "fsdp_tp": {
        "embedding": P("tensor", "fsdp"),
        "wi": P("fsdp", "tensor"),
        "q": P("fsdp", "tensor", None),
        "scale": P(None),
        "bias": P(),
    },
}


@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_param_shardings_golden(preset):
    mesh = _mesh(2, 2, 2)
    model = _Tiny()
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
    shardings = sharding.param_shardings(abstract, mesh, sharding.RULES[preset])
    specs = {k: s.spec for k, s in shardings["params"].items()}
    assert specs == GOLDEN[preset]
    assert all(s.mesh is mesh for s in shardings["params"].values())

    # The shardings place real (unboxed) params; check shard shapes on a concrete init.
    params = jax.jit(
        lambda k: nn.unbox(model.init(k, jnp.zeros((2, 3), jnp.int32))), out_shardings=shardings
    )(jax.random.key(0))
    wi = params["params"]["wi"]
    expected = {"dp": (16, 64), "fsdp": (8, 64), "fsdp_tp": (8, 32)}[preset]
    assert wi.addressable_shards[0].data.shape == expected


def test_logical_to_sharding_activations():
    mesh = _mesh(2, 2, 2)
    tree = {
        "x": P("batch", "length", "act_embed"),
        "h": P("batch", "length", "act_mlp"),
        "a": P("batch", "length", "act_heads", "act_kv"),
    }
    dp = sharding.logical_to_sharding(tree, mesh, sharding.RULES["dp"])
    assert dp["x"].spec == P(("data", "fsdp"), None, None)
    assert dp["h"].spec == P(("data", "fsdp"), None, None)
    fsdp = sharding.logical_to_sharding(tree, mesh, sharding.RULES["fsdp"])
    assert fsdp["x"].spec == P(("data", "fsdp"), None, None)
    tp = sharding.logical_to_sharding(tree, mesh, sharding.RULES["fsdp_tp"])
    assert tp["x"].spec == P(("data", "fsdp"), None, None)
    assert tp["h"].spec == P(("data", "fsdp"), None, "tensor")
    assert tp["a"].spec == P(("data", "fsdp"), None, "tensor", None)
    assert isinstance(tp["a"], NamedSharding)


def test_batch_sharding_and_replicated():
    mesh = _mesh(2, 2, 2)
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.replicated(mesh).spec == P()
    assert sharding.batch_shards(mesh) == 4


def test_shard_batch_placement():
    mesh = _mesh(4, 2, 1)
    tokens = np.arange(16 * 5, dtype=np.int32).reshape(16, 5)
    mask = np.ones((16, 5), np.bool_)
    out = sharding.shard_batch({"tokens": tokens, "mask": mask}, mesh)
    assert set(out) == {"tokens", "mask"}
    arr = out["tokens"]
    assert arr.shape == (16, 5) and arr.dtype == np.int32
    assert arr.sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(arr), tokens)
    # 8 batch shards: device (data=i, fsdp=j) holds rows [2*(2i+j), 2*(2i+j)+2).
    for i in range(4):
        for j in range(2):
            dev = mesh.devices[i, j, 0]
            (shard,) = [s for s in arr.addressable_shards if s.device == dev]
            k = 2 * i + j
            np.testing.assert_array_equal(np.asarray(shard.data), tokens[2 * k : 2 * k + 2])


def test_shard_batch_replicates_over_tensor():
    mesh = _mesh(2, 1, 4)
    x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    arr = sharding.shard_batch({"x": x}, mesh)["x"]
    for t in range(4):
        dev = mesh.devices[1, 0, t]
        (shard,) = [s for s in arr.addressable_shards if s.device == dev]
        np.testing.assert_array_equal(np.asarray(shard.data), x[2:])


def test_batch_divisibility_errors():
    mesh = _mesh(2, 2, 2)
    sharding.check_batch_divisible(8, mesh)
    with pytest.raises(ValueError, match=r"train.batch_size=6 .* = 4"):
        sharding.check_batch_divisible(6, mesh)
    with pytest.raises(ValueError, match=r"'tokens'.*train.batch_size=6"):
        sharding.shard_batch({"tokens": np.zeros((6, 3), np.int32)}, mesh)
    with pytest.raises(ValueError, match="scalar"):
        sharding.shard_batch({"n": np.zeros((), np.int32)}, mesh)
