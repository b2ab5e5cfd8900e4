"""Cluster backends: SLURM through submitit, TPU VMs through gcloud, GKE through xpk.

Each renders what it would submit (`--dry_run` prints exactly that and touches nothing) and
submits the same. SLURM: one array job per stage (split at the cluster's MaxArraySize, which
submitit does not do), a stage that starts from an earlier one depends on its arrays
(`afterok`); every task runs `lm.experiment.state.run_one`, so its run directory records its
log and exit like a local run's. TPU VM: one `gcloud compute tpus tpu-vm ssh --worker=all`
per run, run in turn (multi-host: `--config.train.distributed=True`). GKE: one
`xpk workload create` per run. The sweep dir must be a filesystem every host sees.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import subprocess
from collections.abc import Sequence

from lm.experiment import state as st
from lm.experiment.launch import command, workdir, write_run_record
from lm.experiment.study import Run, Study, main_args


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    partition: str = ""
    time_min: int = 60
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 0
    array_parallelism: int = 64
    max_array_size: int = 0  # 0: read MaxArraySize from `scontrol show config`


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices run 0 .. MaxArraySize - 1); 1001 if unknown."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1001
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else 1001


def _stages(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.stage, []).append(run)
    return list(out.items())


def _chunks(items: Sequence[Run], size: int) -> list[list[Run]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def slurm_arrays(study: Study, runs: Sequence[Run], opts: SlurmOptions
                 ) -> list[tuple[str, list[Run], str | None]]:
    """(array name, its runs, the stage whose arrays it waits for) in submission order."""
    size = opts.max_array_size or max_array_size()
    stage_of = {s.name: s for s in study.stages}
    queued = {r.stage for r in runs}
    arrays = []
    for stage, stage_runs in _stages(runs):
        after = stage_of[stage].init_from
        chunks = _chunks(stage_runs, size)
        for i, chunk in enumerate(chunks):
            name = f"{study.name}-{stage}" + (f"-{i}" if len(chunks) > 1 else "")
            arrays.append((name, chunk, after if after in queued else None))
    return arrays


def _sbatch_flags(name: str, n: int, opts: SlurmOptions, after: str | None) -> list[str]:
    flags = [f"--job-name={name}", f"--array=0-{n - 1}%{min(opts.array_parallelism, n)}",
             f"--time={opts.time_min}", f"--cpus-per-task={opts.cpus_per_task}"]
    if opts.partition:
        flags.append(f"--partition={opts.partition}")
    if opts.gpus_per_node:
        flags.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.mem_gb:
        flags.append(f"--mem={opts.mem_gb}G")
    if after:
        flags.append(f"--dependency=afterok:<arrays of stage {after}>")
    return flags


def slurm_dry_run(study: Study, runs: Sequence[Run], sweep_dir: str, root: str,
                  opts: SlurmOptions) -> list[str]:
    lines = []
    for name, chunk, after in slurm_arrays(study, runs, opts):
        lines.append("sbatch " + " ".join(_sbatch_flags(name, len(chunk), opts, after)))
        for i, run in enumerate(chunk):
            lines.append(f"  [{i}] cd {shlex.quote(root)} && "
                         + shlex.join(command(run, sweep_dir)))
    return lines


def slurm_submit(study: Study, runs: Sequence[Run], sweep_dir: str, root: str,
                 opts: SlurmOptions, wait: bool = False) -> list[str]:
    """Submits the arrays; returns their job ids (with `wait`, after every task ended)."""
    try:
        import submitit  # noqa: PLC0415 (an optional dependency of the slurm backend)
    except ImportError:
        raise ImportError("--backend=slurm: needs submitit (pip install submitit)") from None
    array_ids: dict[str, list[str]] = {}
    jobs = []
    for name, chunk, after in slurm_arrays(study, runs, opts):
        ex = submitit.AutoExecutor(folder=os.path.join(sweep_dir, "slurm", "%j"),
                                   cluster="slurm")
        extra = {}
        if after and array_ids.get(after):
            extra["dependency"] = "afterok:" + ":".join(array_ids[after])
        params = dict(name=name, timeout_min=opts.time_min, cpus_per_task=opts.cpus_per_task,
                      slurm_array_parallelism=opts.array_parallelism, tasks_per_node=1,
                      nodes=1, slurm_additional_parameters=extra)
        if opts.partition:
            params["slurm_partition"] = opts.partition
        if opts.gpus_per_node:
            params["gpus_per_node"] = opts.gpus_per_node
        if opts.mem_gb:
            params["mem_gb"] = opts.mem_gb
        ex.update_parameters(**params)
        with ex.batch():
            chunk_jobs = []
            for run in chunk:
                cmd = command(run, sweep_dir)
                write_run_record(study, run, sweep_dir, cmd)
                chunk_jobs.append(ex.submit(st.run_one, cmd, workdir(sweep_dir, run), root))
        array_id = chunk_jobs[0].job_id.split("_")[0]
        array_ids.setdefault(chunk[0].stage, []).append(array_id)
        print(f"submitted {name}: array job {array_id} ({len(chunk)} tasks)", flush=True)
        jobs.extend(chunk_jobs)
    if wait:
        for job in jobs:
            try:
                job.wait()
            except Exception:  # noqa: BLE001 (the run's exit.json says what happened)
                pass
    return [ids for v in array_ids.values() for ids in v]


# ------------------------------------------------------------------- TPU VM / GKE


@dataclasses.dataclass(frozen=True)
class CloudOptions:
    tpu_name: str = ""
    zone: str = ""
    project: str = ""
    repo_dir: str = "~/lm"  # the checkout on each TPU VM / in the image
    cluster: str = ""  # GKE
    tpu_type: str = ""  # GKE: e.g. v5litepod-16
    num_slices: int = 1
    docker_image: str = ""


def _remote_main(run: Run, sweep_dir: str) -> str:
    args = main_args(run, workdir(sweep_dir, run)) + ["--config.train.distributed=True"]
    return shlex.join(["python3", "-m", "lm.main", *args])


def tpu_vm_commands(runs: Sequence[Run], sweep_dir: str, opts: CloudOptions) -> list[list[str]]:
    if not opts.tpu_name or not opts.zone:
        raise ValueError("--tpu_name and --zone: required by --backend=tpu_vm")
    out = []
    for run in runs:
        remote = f"cd {opts.repo_dir} && {_remote_main(run, sweep_dir)}"
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", opts.tpu_name,
               f"--zone={opts.zone}"]
        if opts.project:
            cmd.append(f"--project={opts.project}")
        out.append(cmd + ["--worker=all", f"--command={remote}"])
    return out


def workload_name(study: Study, run: Run) -> str:
    """xpk / Kubernetes names: lower-case letters, digits and '-', at most 40 characters;
    the suffix hashes the run's name, so it is stable while the run's config evolves."""
    base = re.sub(r"[^a-z0-9-]+", "-", f"{study.name}-{run.stage}".lower()).strip("-")
    return f"{base[:31]}-{hashlib.sha1(run.key.encode()).hexdigest()[:8]}"


def gke_commands(study: Study, runs: Sequence[Run], sweep_dir: str, opts: CloudOptions
                 ) -> list[list[str]]:
    missing = [f for f in ("cluster", "tpu_type", "docker_image") if not getattr(opts, f)]
    if missing:
        raise ValueError(f"--{missing[0]}: required by --backend=gke")
    out = []
    for run in runs:
        cmd = ["xpk", "workload", "create", f"--cluster={opts.cluster}",
               f"--workload={workload_name(study, run)}", f"--tpu-type={opts.tpu_type}",
               f"--num-slices={opts.num_slices}", f"--docker-image={opts.docker_image}"]
        if opts.zone:
            cmd.append(f"--zone={opts.zone}")
        if opts.project:
            cmd.append(f"--project={opts.project}")
        out.append(cmd + [f"--command={_remote_main(run, sweep_dir)}"])
    return out


def run_commands(study: Study, runs: Sequence[Run], cmds: Sequence[list[str]], sweep_dir: str
                 ) -> dict[str, int]:
    """Runs gcloud / xpk commands one after another; run.json is written where the sweep
    dir is visible from here."""
    done = {}
    for run, cmd in zip(runs, cmds, strict=True):
        if os.path.isdir(sweep_dir):
            write_run_record(study, run, sweep_dir, cmd)
        print(f"$ {shlex.join(cmd)}", flush=True)
        done[run.key] = subprocess.run(cmd).returncode
    return done
