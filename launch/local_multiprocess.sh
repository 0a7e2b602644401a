#!/usr/bin/env bash
# N processes x M fake CPU devices on 127.0.0.1 running the main job: a laptop rehearsal of a
# multi-host run (the same jax.distributed path a TPU pod or a GPU cluster takes).
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS --config=configs/digits.py:tiny \
#       --workdir=/tmp/mp
#
# Every argument after the two counts goes to `python -m swinv2_jax.main`. Each process's log
# is $LOG_DIR/process_<i>.log (LOG_DIR defaults to a fresh temporary folder). Exits non-zero
# when any process fails, after stopping the others (they would wait on the coordinator).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
num_processes=$1
devices_per_process=$2
shift 2
log_dir=${LOG_DIR:-$(mktemp -d -t swinv2_mp.XXXXXX)}
mkdir -p "$log_dir"
# An unused port for the coordinator (process 0 binds it).
port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
repo=$(cd "$(dirname "$0")/.." && pwd)

pids=()
for ((i = 0; i < num_processes; i++)); do
  # swinv2_jax.distributed.initialize reads these three; XLA_FLAGS fakes the devices.
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$num_processes JAX_PROCESS_ID=$i \
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices_per_process" \
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" \
    python -m swinv2_jax.main "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "$num_processes processes x $devices_per_process devices, coordinator 127.0.0.1:$port," \
     "logs in $log_dir"

status=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  finished=
  wait -n -p finished "${remaining[@]}" || status=$?
  if [[ $status -ne 0 ]]; then break; fi
  left=()
  for pid in "${remaining[@]}"; do
    if [[ $pid != "$finished" ]]; then left+=("$pid"); fi
  done
  remaining=("${left[@]}")
done
if [[ $status -ne 0 ]]; then
  echo "a process failed; stopping the others" >&2
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  for ((i = 0; i < num_processes; i++)); do
    echo "--- process $i (last lines of $log_dir/process_$i.log)" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2
  done
fi
exit $status
