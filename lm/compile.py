"""Ahead-of-time compilation of a config's exact training step for a TPU topology.

  python -m lm.compile --config=configs/gpt.py:small --topology=v5e:4x4 [--num_slices=N]
      [--config.a.b=...]

Runs on a machine without TPUs (needs libtpu: `pip install -e '.[tpu]'`): the topology's
devices come from `jax.experimental.topologies.get_topology_desc`, the mesh and shardings
from the config as in training, and the jitted step is lowered with abstract arguments and
compiled. Prints, per chip: parameter + optimizer bytes, the step's temporaries, their total
against the chip's HBM, and the step's FLOPs. A step that does not fit exits 1 with the
compiler's out-of-memory line, before any accelerator time is spent (MaxText's
train_compile does the same). No data is read: the vocabulary comes from model.vocab_size or
data.vocab_size, padded to a multiple of 128 so that it divides the mesh.
"""

from __future__ import annotations

import dataclasses
import math
import os

from absl import app, flags
from ml_collections import config_flags

from lm import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment file (configs/X.py:variant).",
                                lock_config=True)
flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4, v4:2x2x2, v5p:2x2x2.")
flags.DEFINE_integer("num_slices", 1, "Slices (multislice over DCN).")
flags.DEFINE_string("chip_config_name", "", "e.g. megacore (v4).")

GIB = 2**30
# HBM per chip (bytes), by the topology name's chip prefix.
HBM = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB, "tpu7x": 192 * GIB}


@dataclasses.dataclass(frozen=True)
class Report:
    chips: int
    param_bytes: int  # per chip: params
    optimizer_bytes: int  # per chip: optimizer state (+ step, rng)
    temp_bytes: int  # per chip: the compiled step's temporaries
    hbm_bytes: int | None
    flops: float  # per chip, one step (a scanned layer body is counted once by XLA)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes + self.temp_bytes

    def lines(self) -> list[str]:
        hbm = f"{self.hbm_bytes / GIB:.2f} GiB" if self.hbm_bytes else "unknown"
        share = (f" ({100 * self.total_bytes / self.hbm_bytes:.1f} % of HBM)"
                 if self.hbm_bytes else "")
        return [f"chips: {self.chips}",
                f"per chip: parameters {self.param_bytes / GIB:.4f} GiB "
                f"({self.param_bytes:,} bytes)",
                f"per chip: optimizer state {self.optimizer_bytes / GIB:.4f} GiB",
                f"per chip: temporaries {self.temp_bytes / GIB:.4f} GiB",
                f"per chip: total {self.total_bytes / GIB:.4f} GiB of {hbm}{share}",
                f"per chip: {self.flops:.4g} FLOPs per step"]


def shard_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def compile_step(config, topology: str, num_slices: int = 1, chip_config_name: str = ""
                 ) -> Report:
    import jax
    from jax.experimental import topologies

    from lm import objectives, sharding, train
    from lm.config_base import to_model_config

    try:
        kwargs = {"chip_config_name": chip_config_name} if chip_config_name else {}
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                            num_slices=num_slices, **kwargs)
    except Exception as e:  # noqa: BLE001 (libtpu raises plain RuntimeErrors)
        raise ValueError(f"--topology: {topology!r}: {' '.join(str(e).split())[:300]}") from None
    devices = topo.devices
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    sharding.check_batch_divisible(config.train.batch_size, mesh)
    vocab = config.model.vocab_size or config.data.get("vocab_size", 0)
    if not vocab:
        raise ValueError("model.vocab_size: 0 (taken from the tokenizer in training); set "
                         "model.vocab_size or data.vocab_size to compile without data")
    objective = objectives.get(config)
    model_cfg = to_model_config(config.model, vocab_size=-(-vocab // 128) * 128)
    setup = train.assemble(config, objective, model_cfg, mesh)
    step = train.make_train_step(setup, config.optim.grad_accum_steps)
    shapes = jax.eval_shape(setup.init_state)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         shapes, setup.state_sharding)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
             for k, v in objective.dummy_batch(config.train.batch_size).items()}
    compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    params = shard_bytes(state.params)
    return Report(chips=len(devices), param_bytes=params,
                  optimizer_bytes=shard_bytes(state) - params,
                  temp_bytes=int(getattr(memory, "temp_size_in_bytes", 0)),
                  hbm_bytes=HBM.get(topology.split(":")[0]),
                  flops=float((cost or {}).get("flops", 0.0)))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        errors.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None or not FLAGS.topology:
        errors.fail("--config and --topology are required")
    from lm import config_check

    # Without these libtpu looks for a TPU VM's metadata server (a minute of timeouts
    # offline); any accelerator type will do, the topology flag decides what is compiled.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chips are claimed here
    # The process's default backend is the CPU, but the program is a TPU one: no CPU
    # kernel (lm/kernels) may enter it.
    os.environ["LM_CPU_KERNELS"] = "0"
    try:
        config_check.validate(FLAGS.config)
        report = compile_step(FLAGS.config, FLAGS.topology, FLAGS.num_slices,
                              FLAGS.chip_config_name)
    except errors.USER_ERRORS as e:
        errors.fail(errors.one_line(e))
    except Exception as e:  # noqa: BLE001 (the compiler's own errors)
        text = " ".join(str(e).split())
        if "RESOURCE_EXHAUSTED" in text:
            oom = text[text.index("RESOURCE_EXHAUSTED"):][:400]
            errors.fail(f"{FLAGS.topology}: the step does not fit: {oom}")
        raise
    print(f"{FLAGS.topology} x {FLAGS.num_slices} slice(s): compiled")
    for line in report.lines():
        print(line)


def _parse(argv: list[str]) -> list[str]:
    """absl parsing; a bad flag or config file is one line (as in lm.main)."""
    try:
        rest = FLAGS(argv)
        if FLAGS.config is not None:
            FLAGS.config.to_dict()  # a file that failed to load raises here
        return rest
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError,
            SyntaxError, ImportError, NameError) as e:
        errors.fail(f"--config: {errors.config_load_error(e)}")
        return []  # fail() exits; this keeps the signature honest


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
