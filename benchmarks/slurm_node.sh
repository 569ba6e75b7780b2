#!/usr/bin/env bash
# A one-node SLURM on this machine (Debian/Ubuntu, run as root, e.g. inside a Docker container), to try
# `distributed: {scheduler: slurm}` and run benchmarks/slurm_check.py without a cluster. Not for
# production: the daemons run as root, with no cgroups and no accounting.
#
#   bash benchmarks/slurm_node.sh          # installs slurm-wlm and munge if missing, starts the daemons
#   python benchmarks/slurm_check.py       # then: infer on SLURM vs one process
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "run as root (it installs packages and starts munged, slurmctld and slurmd)" >&2
  exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
fi

host=$(hostname -s)
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # MB, leaving 10% to the OS
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/run/slurm
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=efficientbioai
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/var/run/slurm/slurmctld.pid
SlurmdPidFile=/var/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
NodeName=${host} CPUs=${cpus} RealMemory=${memory} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  if sinfo -h -o "%t" 2>/dev/null | grep -q idle; then
    sinfo
    exit 0
  fi
  sleep 1
done
echo "SLURM did not come up: see /var/log/slurm/slurmctld.log and /var/log/slurm/slurmd.log" >&2
exit 1
