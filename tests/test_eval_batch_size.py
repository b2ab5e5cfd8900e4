"""evals.batch_size: the validation pass in larger (forward-only) batches gives the same
metrics over the same windows as batches of the training size."""

from __future__ import annotations

import pytest

from lm import config_check, train
from lm.errors import ConfigError
from tests.test_train import make_config


def test_larger_eval_batches_give_the_same_metrics(tmp_path):
    run = {"train.steps": 2, "train.eval_every": 2, "evals.max_batches": 0}
    small = train.train_and_evaluate(make_config(tmp_path, **run), str(tmp_path / "small"))
    large = train.train_and_evaluate(
        make_config(tmp_path, **run, **{"evals.batch_size": 40}), str(tmp_path / "large"))
    assert small["train/loss"] == large["train/loss"]  # training is untouched
    assert large["eval/loss"] == pytest.approx(small["eval/loss"], rel=1e-6)
    assert large["eval/accuracy"] == pytest.approx(small["eval/accuracy"], rel=1e-6)


def test_negative_eval_batch_size_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^evals.batch_size: must be >= 0, got -1$"):
        config_check.validate(make_config(tmp_path, **{"evals.batch_size": -1}))
