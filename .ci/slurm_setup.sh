#!/usr/bin/env bash
# CI: a one-node SLURM on this machine for tests/test_slurm.py: installs Debian's slurm-wlm and
# munge when missing, writes /etc/slurm/slurm.conf for this host, starts munged, slurmctld and
# slurmd directly (no systemd in a container) and waits until the node is idle. Idempotent: a
# second call finds the daemons up and only waits. Needs root. See launch/README.md.
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
  echo "error: $0 installs packages and starts daemons: run it as root" >&2
  exit 2
fi
missing=()
command -v munged >/dev/null || missing+=(munge)
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
if [[ ${#missing[@]} -gt 0 ]]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
fi

host=$(hostname -s)
# JAX's coordinator is the step's first node by name (jax/_src/clusters/slurm_cluster.py): the
# name must resolve. A container's name may not be in /etc/hosts.
if ! getent hosts "$host" >/dev/null; then
  echo "127.0.0.1 $host" >>/etc/hosts
fi
# The CPU twin runs 2 one-CPU tasks on this node. config_overrides lets slurmd take this count
# on a one-core machine too, where it would otherwise drain the node for too few CPUs.
cpus=$(nproc)
cpus=$((cpus < 2 ? 2 : cpus))
conf=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/munge
chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm
chown munge:munge /run/munge
new=$(cat <<EOF
# Written by .ci/slurm_setup.sh: one node, no cgroups, no accounting database.
ClusterName=swinv2
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# A container has no systemd-managed cgroup tree for SLURM to own: track a job's processes
# through /proc (proctrack/linuxproc) and do not bind tasks to CPUs (task/none).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
# scancel sends SIGTERM, then SIGKILL after KillWait seconds (default 30).
KillWait=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=
if [[ ! -f $conf || $(cat "$conf") != "$new" ]]; then
  printf '%s\n' "$new" >"$conf"
  changed=1
fi

running() {  # pid file -> is that process alive (a zombie is not: no init may reap it here)
  local state
  state=$([[ -f $1 ]] && ps -o stat= -p "$(cat "$1")" 2>/dev/null) || return 1
  [[ $state != Z* ]]
}

# munge: the key Debian's package made, else a new one; munged runs as its own user.
if [[ ! -f /etc/munge/munge.key ]]; then
  mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- munged
fi

if running /run/slurmctld.pid; then
  if [[ -n $changed ]]; then scontrol reconfigure; fi
else
  slurmctld
fi
if ! running /run/slurmd.pid; then
  slurmd
fi

for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  if [[ $state == idle || $state == mix || $state == alloc ]]; then
    echo "slurm: node $host $state, $cpus CPUs"
    exit 0
  fi
  sleep 1
done
echo "error: slurm node $host not idle after 60 s (state '${state:-}'); daemon logs:" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2
exit 1
