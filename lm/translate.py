"""Translate with a seq2seq run: `python -m lm.translate --workdir=DIR --text "..." [--text
...] [--file F] [--source en --target de] [--beam_size 4 --alpha 0.6 --max_len N --step N]`.

Loads DIR's config.json, tokenizer, seq2seq.json (the run's direction and lengths) and the
checkpoint's params (read-only: safe on a run still training), beam-searches each text and
prints one translation per line, in input order. `--source` / `--target`, when given, must
be the run's direction. Errors are one line on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lm import errors
from lm.predict import read_texts


def load_run(workdir: str, step: int | None):
    """(model config, params, tokenizer, task info) of a seq2seq run."""
    from ml_collections import ConfigDict

    from lm.config_base import to_model_config
    from lm.data.tokenizers import load_tokenizer
    from lm.init_from import read_run_params
    from lm.objectives.seq2seq import TASK_FILE

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir: no config.json in {workdir} (not a run directory)")
    with open(path) as f:
        config = ConfigDict(json.load(f))
    task_path = os.path.join(workdir, TASK_FILE)
    if config.objective != "seq2seq" or not os.path.isfile(task_path):
        raise ValueError(f"--workdir: {workdir} is a {config.objective!r} run, not a "
                         "translation (seq2seq) run")
    with open(task_path) as f:
        task = json.load(f)
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
    vocab = tokenizer.vocab_size + int(config.data.get("extra_ids", 0))
    model_cfg = to_model_config(config.model, vocab_size=vocab)
    params, _ = read_run_params(workdir, step)
    return model_cfg, params, tokenizer, task


def check_direction(task: dict, source: str | None, target: str | None) -> None:
    for flag, given, key in (("--source", source, "source_lang"),
                             ("--target", target, "target_lang")):
        if given and given != task.get(key):
            raise ValueError(f"{flag}={given}: this run translates {task.get('source_lang')}"
                             f" -> {task.get('target_lang')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm.translate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory of a seq2seq run")
    parser.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    parser.add_argument("--file", action="append", default=[], help="one text per line")
    parser.add_argument("--source", default=None, help="source language (checked)")
    parser.add_argument("--target", default=None, help="target language (checked)")
    parser.add_argument("--beam_size", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.6, help="GNMT length penalty")
    parser.add_argument("--max_len", type=int, default=0, help="0: the run's targets_length")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    args = parser.parse_args(argv)
    try:
        if args.beam_size < 1:
            raise ValueError(f"--beam_size={args.beam_size}: must be >= 1")
        if args.alpha < 0:
            raise ValueError(f"--alpha={args.alpha}: must be >= 0")
        if not os.path.isdir(args.workdir):
            raise FileNotFoundError(f"--workdir: no such directory: {args.workdir}")
        texts = read_texts(args.text, args.file)
        model_cfg, params, tokenizer, task = load_run(os.path.abspath(args.workdir), args.step)
        check_direction(task, args.source, args.target)
        from lm.objectives.seq2seq import translate

        lines = translate(model_cfg, params, tokenizer, texts,
                          inputs_length=int(task["inputs_length"]),
                          max_len=args.max_len or int(task["targets_length"]),
                          beam_size=args.beam_size, alpha=args.alpha,
                          batch_size=min(args.batch_size, len(texts)))
    except errors.USER_ERRORS as e:
        print(f"error: {errors.one_line(e)}", file=sys.stderr)
        sys.exit(1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
