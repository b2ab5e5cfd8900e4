#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests of the slurm backend and of
# multi-process runs (`srun -n 2`). Installs Debian's slurmctld, slurmd and munge when
# missing (needs root and apt), writes a one-node slurm.conf and starts the daemons.
# Idempotent: a controller that already answers is left alone. Exit 1 when it cannot start.
set -euo pipefail

if sinfo -h >/dev/null 2>&1 && [ -n "$(sinfo -h -o %T 2>/dev/null)" ]; then
  echo "local_slurm: already running ($(sinfo -h -o '%N %T' | head -1))"; exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "local_slurm: SLURM is not installed and this is not a root Debian machine" >&2; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
MaxArraySize=1001
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
rm -f /etc/slurm/cgroup.conf

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 1 30); do
  state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
  case "$state" in idle*|mix*|alloc*) echo "local_slurm: node ${host} ${state}"; exit 0;; esac
  sleep 1
done
echo "local_slurm: the node did not become idle (state: ${state:-none}); see /var/log/slurm" >&2
exit 1
