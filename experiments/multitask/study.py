"""Does one MiniLM trained on SST-2 and CoNLL-2003 together match the two single-task runs?

Four runs of all-MiniLM-L6-v2 (configs/multitask.py:minilm), one seed, batch 16, AdamW
1e-4 with 10 % warmup and linear decay to 0, the same for every run:
  sst2_only   SST-2 alone, STEPS steps (a one-task mixture, which is exactly the
              single-task run: tests/test_mixture.py)
  conll_only  CoNLL-2003 alone, STEPS steps
  mixture / task  2 x STEPS steps, each batch from one task drawn at equal rates (about
              STEPS steps per task)
  mixture / rows  2 x STEPS steps, each batch 8 rows of each task (STEPS x 16 examples per
              task, as alone)
So every task sees the same number of examples in every arm, and a mixture costs what the
two single-task runs cost together. Evaluation at the last step on the first EVAL_BATCHES
batches of 16 of each validation set (512 of SST-2's 872 sentences, 512 of CoNLL's
3,250), to fit the CPU budget.
"""

from __future__ import annotations

import json
import os

from lm.experiment import Report, Stage, Study, Zip
from lm.rundir import read_metrics

STEPS = 60
BATCH = 16
EVAL_BATCHES = 32
COMMON = {"train.batch_size": BATCH, "evals.max_batches": EVAL_BATCHES, "train.log_every": 5,
          "optim.lr": 1e-4}


def _steps(n: int) -> dict:
    return {**COMMON, "train.steps": n, "optim.warmup_steps": n // 10, "train.eval_every": n,
            "train.checkpoint_every": n}


def per_task_steps(workdir: str) -> dict[str, float]:
    """Batches (or batch shares, for rows batching) each task got: recomputed from the run's
    config, since the task draw is a function of the seed and the step."""
    from lm.data import mixture as mix

    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    tasks, steps = config["tasks"], config["train"]["steps"]
    names = list(tasks)
    if len(names) == 1:
        return {names[0]: float(steps)}
    rates = mix.mixing_rates("explicit", names, rates={n: tasks[n]["rate"] for n in names})
    if config["data"]["batching"] == "rows":
        rows = mix.allocate_rows(rates, config["train"]["batch_size"])
        return {n: steps * rows[n] / config["train"]["batch_size"] for n in names}
    it = mix.MixtureIterator({n: iter(()) for n in names}, rates, config["seed"])
    drawn = [it.task_at(s) for s in range(steps)]
    return {n: float(drawn.count(n)) for n in names}


def _cell(values: dict, key: str) -> str:
    return f"{values[key]:.4f}" if key in values else "–"


def table(results, out_dir: str) -> str:
    """SST-2 accuracy and CoNLL-2003 entity F1 of every run, side by side."""
    lines = ["| arm | steps | SST-2 examples / 16 | CoNLL examples / 16 | SST-2 accuracy "
             "| CoNLL entity F1 (P / R) |", "|---|---|---|---|---|---|"]
    for r in results.runs:
        records = read_metrics(r.workdir)
        last = {}
        for rec in records:
            last.update({k: v for k, v in rec.items() if k.startswith("eval/")})
        if r.state.state != "finished":
            lines.append(f"| {r.run.key} | {r.state.state} | | | | |")
            continue
        steps = per_task_steps(r.workdir)
        f1 = _cell(last, "eval/conll/f1")
        if f1 != "–":
            f1 += (f" ({_cell(last, 'eval/conll/precision')} / "
                   f"{_cell(last, 'eval/conll/recall')})")
        lines.append(
            f"| {r.run.stage}/{dict(r.run.setting).get('arm', '')} | {r.state.step} | "
            f"{steps.get('sst2', 0):.0f} | {steps.get('conll', 0):.0f} | "
            f"{_cell(last, 'eval/sst2/accuracy')} | {f1} |")
    return "\n".join(["Both tasks, last step (one seed):", "", *lines])


def get_study() -> Study:
    single = [Stage(name=f"{task}_only", config=f"configs/multitask.py:minilm,only={task}",
                    overrides=_steps(STEPS),
                    axes=[Zip({"config": [f"configs/multitask.py:minilm,only={task}"]},
                              name="arm", labels=[task])], seeds=[0])
              for task in ("sst2", "conll")]
    mixture = Stage(
        name="mixture",
        config="configs/multitask.py:minilm",
        overrides=_steps(2 * STEPS),
        axes=[Zip({"config": ["configs/multitask.py:minilm,batching=task",
                              "configs/multitask.py:minilm,batching=rows"]},
                  name="arm", labels=["task", "rows"])],
        seeds=[0],
    )
    return Study(
        name="multitask",
        question="does one MiniLM trained on SST-2 + CoNLL-2003 together match each "
                 "single-task run with the same examples per task?",
        stages=[mixture, *single],  # the mixtures first: the new code path fails early
        report=Report(metric="eval/sst2/accuracy", mode="last", goal="max",
                      stages=("sst2_only", "mixture")),
        analyses=[table],
    )
