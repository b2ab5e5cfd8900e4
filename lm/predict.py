"""Predict with a fine-tuned run: `python -m lm.predict --workdir=DIR --text "..." [--text
...] [--file texts.txt] [--step N]`.

Loads DIR's config.json, tokenizer, labels.json and checkpoint (the latest, or --step) and
prints one line per text: `LABEL<TAB>SCORE<TAB>TEXT` for classification (SCORE is the
softmax probability of LABEL; a tab inside a text separates a sentence pair), `word/TAG ...`
for tagging. --file reads one text per line. Errors are one line on stderr, exit code 1.

The training data is not needed: unlike `lm.train.build`, which reads and tokenizes the
training set, this builds only the model, and reads only the params of the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def load_run(workdir: str, step: int | None = None) -> tuple[Any, Any, Any]:
    """(objective ready to predict, model, params) of a trained run."""
    from ml_collections import ConfigDict

    from lm import objectives
    from lm.config_base import to_model_config
    from lm.init_from import read_run_params

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir: no config.json in {workdir} (not a run directory)")
    with open(path) as f:
        config = ConfigDict(json.load(f))
    objective = objectives.get(config)
    if not hasattr(objective, "predict"):
        raise ValueError(f"objective: {config.objective!r} has no prediction")
    objective.load_inference(workdir)
    model = objective.build_model(
        to_model_config(config.model, vocab_size=objective.tokenizer.vocab_size))
    # Read-only (params only, as numpy): safe on a run that is still training, whose
    # in-flight saves an orbax manager would clean up.
    params, _ = read_run_params(workdir, step)
    return objective, model, params


def validation_predictions(workdir: str, step: int | None = None, limit: int = 0
                           ) -> tuple[list[str], list[str], list[str]]:
    """(gold labels, predicted labels, the run's labels) on a classification run's
    validation split, re-read from its config's data the way training split it; `limit`
    keeps the first N examples (0 = all)."""
    from ml_collections import ConfigDict

    from lm.data import labelled

    with open(os.path.join(workdir, "config.json")) as f:
        data = ConfigDict(json.load(f)).data
    examples = labelled.read_examples(data, data.path, "data.path")
    if data.get("val_path", ""):
        val = labelled.read_examples(data, data.val_path, "data.val_path")
    else:
        val = [examples[i] for i in labelled.split_examples(data, examples)[1]]
    val = val[:limit] if limit else val
    objective, model, params = load_run(workdir, step)
    label_map = labelled.parse_label_map(data.get("label_map", ""))
    gold = [label_map.get(ex.label, ex.label) for ex in val]
    texts = [ex.text if ex.text_pair is None else f"{ex.text}\t{ex.text_pair}" for ex in val]
    predicted = [line.split("\t", 1)[0] for line in objective.predict(model, params, texts)]
    return gold, predicted, list(objective.labels)


def read_texts(texts: list[str], files: list[str]) -> list[str]:
    out = list(texts)
    for name in files:
        if not os.path.isfile(name):
            raise FileNotFoundError(f"--file: file not found: {name}")
        with open(name, encoding="utf-8") as f:
            out.extend(line.rstrip("\n") for line in f if line.strip())
    if not out:
        raise ValueError("--text / --file: nothing to predict")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory of a fine-tuning run")
    parser.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    parser.add_argument("--file", action="append", default=[], help="one text per line")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    args = parser.parse_args(argv)
    try:
        if not os.path.isdir(args.workdir):
            raise FileNotFoundError(f"--workdir: no such directory: {args.workdir}")
        texts = read_texts(args.text, args.file)
        objective, model, params = load_run(os.path.abspath(args.workdir), args.step)
        lines = objective.predict(model, params, texts)
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e).strip("'\""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
