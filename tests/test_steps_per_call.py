"""Several optimizer steps per compiled call (train.steps_per_call): the same parameters,
every step's metrics at its own step number, evals and checkpoints on their steps, and an
exact resume, whatever the step count per call. All bit for bit on XLA:CPU (the scanned
step is the same computation as the single one)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lm import checkpoint, config_check, train
from lm.errors import ConfigError
from tests.test_train import losses, make_config, read_metrics

# 10 steps, eval every 4, checkpoint every 4: K=4 divides the intervals but not the run's
# length (the last call runs 2 steps); K=3 divides none of them (calls of 3, 1, 3, 1, 2).
RUN = {"train.steps": 10, "train.log_every": 1, "train.eval_every": 4,
       "train.checkpoint_every": 4, "optim.decay_steps": 10}


def run(tmp_path, name: str, k: int, **overrides) -> tuple[dict, str]:
    workdir = str(tmp_path / name)
    c = make_config(tmp_path, **RUN, **{"train.steps_per_call": k}, **overrides)
    last = train.train_and_evaluate(c, workdir)
    return last, workdir


def final_state(tmp_path, workdir: str, step: int):
    setup = train.build(make_config(tmp_path, **RUN), str(tmp_path / "scratch"))
    target = checkpoint.abstract_like(setup.init_state())
    with checkpoint.Checkpointer(workdir, max_to_keep=3, save_every=4) as ck:
        return ck.restore(step, target)


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("k1")
    last, workdir = run(tmp_path, "k1", 1)
    return tmp_path, last, workdir


@pytest.mark.parametrize("k", [4, 3])
def test_k_steps_per_call_match_one_step_per_call(one_step_run, k):
    tmp_path, last_1, dir_1 = one_step_run
    last_k, dir_k = run(tmp_path, f"k{k}", k)
    # Every step's loss is logged at its own step number and equals the K=1 run's.
    assert sorted(losses(dir_k)) == list(range(1, 11))
    assert losses(dir_k) == losses(dir_1), (losses(dir_k), losses(dir_1))
    lrs = {m["step"]: m["train/lr"] for m in read_metrics(dir_k) if "train/lr" in m}
    lrs_1 = {m["step"]: m["train/lr"] for m in read_metrics(dir_1) if "train/lr" in m}
    assert lrs == lrs_1  # the schedule is read at each step's own count
    evals = [m["step"] for m in read_metrics(dir_k) if "eval/loss" in m]
    assert evals == [4, 8, 10]
    assert last_k["eval/loss"] == last_1["eval/loss"]
    with checkpoint.Checkpointer(dir_k, max_to_keep=3, save_every=4) as ck:
        assert ck.all_steps() == [4, 8, 10]  # keep_checkpoints=3 of the test config
    (a, data_a), (b, data_b) = (final_state(tmp_path, d, 10) for d in (dir_1, dir_k))
    assert data_a == data_b  # the iterator consumed exactly the same batches
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_mid_run_with_k_steps_per_call_is_exact(tmp_path):
    _, straight = run(tmp_path, "straight", 4)
    split = str(tmp_path / "split")
    c = make_config(tmp_path, **{**RUN, "train.steps": 6}, **{"train.steps_per_call": 4})
    train.train_and_evaluate(c, split)  # checkpoints at 4 and 6 (calls of 4, 2)
    train.train_and_evaluate(make_config(tmp_path, **RUN, **{"train.steps_per_call": 4}),
                             split)  # resumes at 6: calls of 2, 2
    assert losses(split) == losses(straight)
    (a, data_a), (b, data_b) = (final_state(tmp_path, d, 10) for d in (straight, split))
    assert data_a == data_b
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_steps_per_call_is_a_one_line_error(tmp_path):
    c = make_config(tmp_path, **{"train.steps_per_call": 0})
    with pytest.raises(ConfigError, match=r"^train.steps_per_call: must be >= 1, got 0$"):
        config_check.validate(c)
