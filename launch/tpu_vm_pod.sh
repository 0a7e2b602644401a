#!/usr/bin/env bash
# SwinV2 on a Cloud TPU VM slice (e.g. v4-32: 4 hosts): copy the repository to every worker,
# install it with jax[tpu], then start the same command on all workers at once. Each process
# calls jax.distributed.initialize() with no arguments (--config.distributed.coordinator_address=auto)
# and JAX reads the slice's hosts and its own worker number from the TPU metadata server.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_vm_pod.sh setup
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=gs://my-bucket/runs/swinv2_b \
#       launch/tpu_vm_pod.sh run --config=configs/swinv2_b.py \
#       --config.data.data_dir=gs://my-bucket/tensorflow_datasets
#
# WORKDIR is one place every worker sees, since all workers write the same orbax checkpoint:
# a gs:// bucket (the workers' service account needs write access; docs/cloud.md) or a folder
# shared at the same path (Filestore / NFS).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
project_flag=${PROJECT:+--project=$PROJECT}
remote_dir=swinv2_jax
repo=$(cd "$(dirname "$0")/.." && pwd)

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $project_flag --worker=all \
    --command="$1"
}

case "${1:-}" in
  setup)
    # The repository (not its runs or caches) to every worker's home folder.
    tar -C "$repo" --exclude=.git --exclude=runs --exclude='__pycache__' -czf /tmp/swinv2_jax.tgz .
    gcloud compute tpus tpu-vm scp /tmp/swinv2_jax.tgz "$TPU_NAME":~/ --zone="$ZONE" \
      $project_flag --worker=all
    # The pinned requirements with the TPU build of jax (same version) instead of the CPU one.
    on_all_workers "mkdir -p ~/$remote_dir && tar -C ~/$remote_dir -xzf ~/swinv2_jax.tgz && \
      cd ~/$remote_dir && python3 -m venv ~/venv && \
      sed 's/^jax\[cpu\]/jax[tpu]/' requirements.txt > /tmp/requirements_tpu.txt && \
      ~/venv/bin/pip install -q -r /tmp/requirements_tpu.txt"
    ;;
  run)
    shift
    : "${WORKDIR:?set WORKDIR to gs://BUCKET/PATH or a folder shared by all workers}"
    args=$(printf ' %q' "$@")
    # Output of every worker streams back here, prefixed by gcloud with the worker number.
    on_all_workers "cd ~/$remote_dir && ~/venv/bin/python -m swinv2_jax.main$args \
      --config.distributed.coordinator_address=auto --workdir=$(printf %q "$WORKDIR")"
    ;;
  *)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
