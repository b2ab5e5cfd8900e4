"""Command line: `python -m lm.main --config=configs/NAME.py:VARIANT --workdir=DIR
[--config.a.b=VALUE ...]`. Running the same command again resumes from DIR.

Bad input (a misspelt or ill-typed override, a missing file, an indivisible batch) ends
the run before any compute with one line on stderr naming the field, and exit code 1.
"""

from __future__ import annotations

import logging as py_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

from lm import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment file (configs/X.py:variant).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.json.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host without cluster auto-detection: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


class _Quiet(py_logging.Filter):
    """Keeps orbax's per-save chatter out of the console (warnings still pass)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


fail = errors.fail


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, but a bad config file or override is one line naming it, and every
    field is checked (lm.config_check) before anything is built."""
    from lm import config_check

    try:
        rest = FLAGS(argv)
        config = FLAGS.config  # applies the --config.* overrides
        if config is not None:
            config.to_dict()  # a file that failed to load raises here
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError,
            SyntaxError, ImportError, NameError) as e:
        fail(f"--config: {errors.config_load_error(e)}")
    if config is None or not FLAGS.workdir:
        fail("--config and --workdir are required")
    if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
        fail(f"--workdir: {FLAGS.workdir} exists and is not a directory")
    try:
        config_check.validate(config)
    except ValueError as e:
        fail(str(e))
    return rest


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    py_logging.getLogger("absl").addFilter(_Quiet())
    config = FLAGS.config
    from lm import runtime

    # before any backend starts: the CPU flags that suit the compute dtype (bf16 dots)
    switched = runtime.set_compute_dtype(config.model.get("dtype", "float32"))
    import jax  # after flag parsing: XLA/platform flags are already in the environment

    if switched:
        logging.info("XLA CPU flag for %s compute: %s", config.model.dtype, switched)
    cache = runtime.configure_compilation_cache()
    if cache:
        logging.info("compilation cache: %s (LM_COMPILATION_CACHE= turns it off)", cache)

    if config.train.distributed:
        # On TPU pods and SLURM/MPI clusters the arguments are detected; elsewhere pass
        # --coordinator_address, --num_processes and --process_id.
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    # the backend may start only now (jax.distributed.initialize must come first)
    slow = runtime.slow_dtype_warning(config.model.get("dtype", "float32"),
                                      jax.default_backend())
    if slow:
        logging.warning(slow)
    from lm import rundir, train

    logging.info("devices: %s", jax.devices())
    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except (*errors.USER_ERRORS, train.NonFiniteLoss, rundir.WorkdirBusy) as e:
        fail(errors.one_line(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
