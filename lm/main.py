"""Command line: `python -m lm.main --config=configs/NAME.py:VARIANT --workdir=DIR
[--config.a.b=VALUE ...]`. Running the same command again resumes from DIR.

Bad input (a misspelt or ill-typed override, a missing file, an indivisible batch) ends
the run before any compute with one line on stderr naming the field, and exit code 1.
"""

from __future__ import annotations

import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, but a bad override is one line naming the field, not a traceback."""
    try:
        rest = FLAGS(argv)
        config = FLAGS.config  # applies the --config.* overrides
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        msg = " ".join(str(e).replace("\\n", " ").replace("\\", "").replace("'", "").split())
        fail(f"bad flag: {msg}")
    if config is None or not FLAGS.workdir:
        fail("--config and --workdir are required")
    return rest


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    py_logging.getLogger("absl").addFilter(_Quiet())
    config = FLAGS.config
    import jax  # after flag parsing: XLA/platform flags are already in the environment

    if config.train.distributed:
        # On TPU pods and SLURM/MPI clusters the arguments are detected; elsewhere pass
        # --coordinator_address, --num_processes and --process_id.
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    from lm import train

    logging.info("devices: %s", jax.devices())
    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, train.NonFiniteLoss) as e:
        fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
