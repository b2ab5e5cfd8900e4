"""`python -m lm.sample --workdir=DIR --prompt TEXT [--max_new_tokens N --temperature T
--top_k K --top_p P --seed S --num_samples N]`: sample from a causal-LM run's latest
checkpoint through the KV cache (greedy when --temperature=0)."""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags
from ml_collections import ConfigDict

from lm import errors

flags.DEFINE_string("workdir", None, "Run directory of a causal-LM run.")
flags.DEFINE_string("prompt", "\n", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 300, "Tokens to sample.")
flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("num_samples", 1, "Independent samples.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
FLAGS = flags.FLAGS


def load_run(workdir: str, step: int | None = None):
    """(model config, params, tokenizer) of a causal-LM run directory."""
    from lm import runtime
    from lm.config_base import to_model_config
    from lm.data.tokenizers import load_tokenizer
    from lm.init_from import read_run_params

    workdir = os.path.abspath(workdir)  # orbax needs absolute checkpoint paths
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir: no config.json in {workdir}")
    with open(path) as f:
        config = ConfigDict(json.load(f))
    # the CPU flags that suit the run's compute dtype, if no backend has started yet
    runtime.set_compute_dtype(config.model.get("dtype", "float32"))
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
    model_cfg = to_model_config(config.model, vocab_size=tokenizer.vocab_size)
    # Read-only: never opens a checkpoint manager on a run that may still be training.
    params, _ = read_run_params(workdir, step)
    return model_cfg, params, tokenizer


def check_flags() -> None:
    """Sampling options out of range are errors naming the flag, before any loading."""
    checks = [
        ("--max_new_tokens", FLAGS.max_new_tokens >= 1, "must be >= 1"),
        ("--temperature", FLAGS.temperature >= 0, "must be >= 0 (0 = greedy)"),
        ("--top_k", FLAGS.top_k >= 0, "must be >= 0 (0 = all tokens)"),
        ("--top_p", 0 < FLAGS.top_p <= 1, "must be in (0, 1]"),
        ("--num_samples", FLAGS.num_samples >= 1, "must be >= 1"),
    ]
    for flag, ok, why in checks:
        if not ok:
            raise ValueError(f"{flag}={getattr(FLAGS, flag[2:])}: {why}")
    if not FLAGS.workdir:
        raise ValueError("--workdir is required")
    if not os.path.isdir(FLAGS.workdir):
        raise FileNotFoundError(f"--workdir: no such directory: {FLAGS.workdir}")


@errors.boundary()
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    from lm.generate import generate

    model_cfg, params, tokenizer = load_run(FLAGS.workdir, FLAGS.step)
    ids = tokenizer.encode(FLAGS.prompt)
    if not ids:
        raise ValueError("--prompt: encodes to no tokens")
    prompt = np.tile(np.asarray(ids, np.int32)[None], (FLAGS.num_samples, 1))
    out = generate(model_cfg, params, prompt, max_new_tokens=FLAGS.max_new_tokens,
                   temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                   seed=FLAGS.seed, eos_id=tokenizer.special_id("</s>"))
    for row in out:
        print(tokenizer.decode(row.tolist()))
        if FLAGS.num_samples > 1:
            print("-" * 40)


if __name__ == "__main__":
    app.run(main)
