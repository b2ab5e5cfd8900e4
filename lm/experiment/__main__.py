"""`python -m lm.experiment {launch,status,report} experiments/NAME [flags]`.

  launch   expand the study, skip finished runs, start or resume the rest
           (--backend=local|slurm|tpu_vm|gke, --dry_run prints what would run)
  status   one line per run: state, step, latest value of the reported metric
  report   results.md + plots in the study folder, and the README's results section

The sweep dir (one workdir per run, `STAGE/NAME`) defaults to $LM_SWEEPS/NAME, else
~/lm-sweeps/NAME: outside the checkout, so a study outlives it and relaunching resumes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from lm.errors import boundary
from lm.experiment import cloud, launch, report
from lm.experiment.study import expand, load_study


def default_sweep_dir(name: str) -> str:
    root = os.environ.get("LM_SWEEPS") or os.path.join(os.path.expanduser("~"), "lm-sweeps")
    return os.path.join(root, name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lm.experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("launch", "status", "report"):
        s = sub.add_parser(name)
        s.add_argument("study", help="experiments/NAME (or its study.py)")
        s.add_argument("--sweep_dir", default="", help="default: $LM_SWEEPS/NAME")
        if name == "launch":
            s.add_argument("--backend", choices=("local", "slurm", "tpu_vm", "gke"),
                           default="local")
            s.add_argument("--dry_run", action="store_true", help="print, touch nothing")
            s.add_argument("--parallel", type=int, default=0,
                           help="local runs at a time (default: one per GPU, or cores / 4)")
            s.add_argument("--on_change", choices=("refuse", "restart"), default="refuse",
                           help="runs whose config changed since their launch")
            s.add_argument("--partition", default="")
            s.add_argument("--time_min", type=int, default=60)
            s.add_argument("--gpus_per_node", type=int, default=0)
            s.add_argument("--cpus_per_task", type=int, default=2)
            s.add_argument("--mem_gb", type=int, default=0)
            s.add_argument("--array_parallelism", type=int, default=64)
            s.add_argument("--max_array_size", type=int, default=0,
                           help="default: the cluster's MaxArraySize")
            s.add_argument("--wait", action="store_true", help="slurm: wait for every task")
            for flag in ("tpu_name", "zone", "project", "cluster", "tpu_type",
                         "docker_image"):
                s.add_argument(f"--{flag}", default="")
            s.add_argument("--repo_dir", default="~/lm")
            s.add_argument("--num_slices", type=int, default=1)
        if name == "report":
            s.add_argument("--out", default="", help="default: the study's folder")
    return p


@boundary()
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    study, root = load_study(args.study)
    path = os.path.abspath(args.study)
    study_dir = os.path.dirname(path) if path.endswith(".py") else path
    sweep_dir = os.path.abspath(os.path.expanduser(args.sweep_dir or
                                                   default_sweep_dir(study.name)))
    runs = expand(study, root, sweep_dir)
    if args.command == "status":
        print(report.status_table(report.collect(study, runs, sweep_dir)))
        return 0
    if args.command == "report":
        results = report.collect(study, runs, sweep_dir)
        cmd = f"python -m lm.experiment report {os.path.relpath(study_dir, root)}"
        path = report.write_report(results, args.out or study_dir, cmd)
        print(report.results_table(results))
        print(f"wrote {path}")
        return 0
    return _launch(args, study, runs, root, sweep_dir)


def _launch(args, study, runs, root: str, sweep_dir: str) -> int:
    p = launch.plan(runs, sweep_dir)
    for line in launch.describe(p):
        print(line)
    if args.dry_run:
        if p.changed and args.on_change != "restart":
            print("(a real launch refuses while runs are changed; see --on_change)")
        todo = p.todo + (p.changed if args.on_change == "restart" else [])
        for line in _rendered(args, study, todo, root, sweep_dir):
            print(line)
        return 0
    launch.resolve_changes(p, sweep_dir, args.on_change)
    if not p.todo:
        print("nothing to do")
        return 0
    if args.backend == "local":
        parallel = args.parallel or launch.default_parallel()
        done = launch.run_local(study, p.todo, sweep_dir, root, parallel, everything=runs)
        failed = [k for k, code in done.items() if code != 0]
        return 1 if failed else 0
    if args.backend == "slurm":
        cloud.slurm_submit(study, p.todo, sweep_dir, root, _slurm_options(args), wait=args.wait)
        return 0
    cmds = _cloud_commands(args, study, p.todo, sweep_dir)
    done = cloud.run_commands(study, p.todo, cmds, sweep_dir)
    return 1 if any(done.values()) else 0


def _slurm_options(args) -> cloud.SlurmOptions:
    return cloud.SlurmOptions(
        partition=args.partition, time_min=args.time_min, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
        array_parallelism=args.array_parallelism, max_array_size=args.max_array_size)


def _cloud_options(args) -> cloud.CloudOptions:
    return cloud.CloudOptions(
        tpu_name=args.tpu_name, zone=args.zone, project=args.project, repo_dir=args.repo_dir,
        cluster=args.cluster, tpu_type=args.tpu_type, num_slices=args.num_slices,
        docker_image=args.docker_image)


def _cloud_commands(args, study, todo, sweep_dir: str) -> list[list[str]]:
    if args.backend == "tpu_vm":
        return cloud.tpu_vm_commands(todo, sweep_dir, _cloud_options(args))
    return cloud.gke_commands(study, todo, sweep_dir, _cloud_options(args))


def _rendered(args, study, todo, root: str, sweep_dir: str) -> list[str]:
    if args.backend == "local":
        return [f"cd {shlex.quote(root)} && {shlex.join(launch.command(r, sweep_dir))}"
                for r in todo]
    if args.backend == "slurm":
        return cloud.slurm_dry_run(study, todo, sweep_dir, root, _slurm_options(args))
    return [shlex.join(c) for c in _cloud_commands(args, study, todo, sweep_dir)]


if __name__ == "__main__":
    sys.exit(main())
