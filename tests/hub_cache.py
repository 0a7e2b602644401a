"""A Hugging Face Hub cache built on disk, in the layout huggingface_hub writes, so that tests
load `hf-hub:` ids through the real `hf_hub_download` with no network (HF_HUB_OFFLINE=1)."""

import hashlib
import os

import numpy as np
from safetensors.numpy import save

REVISION = "5c0ffee5c0ffee5c0ffee5c0ffee5c0ffee5c0ff"  # a commit hash: 40 hex digits


def write_hub_cache(cache_dir, repo_id: str, files: dict) -> str:
  """Adds `repo_id`'s `files` ({name: bytes}) at REVISION to the cache at `cache_dir`:
  models--<owner>--<name>/blobs/<sha256>, snapshots/<revision>/<name> -> ../../blobs/<sha256>,
  refs/main = <revision>. Returns the snapshot directory."""
  folder = os.path.join(os.fspath(cache_dir), "models--" + repo_id.replace("/", "--"))
  snapshot = os.path.join(folder, "snapshots", REVISION)
  os.makedirs(os.path.join(folder, "blobs"), exist_ok=True)
  os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
  os.makedirs(snapshot, exist_ok=True)
  for name, data in files.items():
    blob = hashlib.sha256(data).hexdigest()
    with open(os.path.join(folder, "blobs", blob), "wb") as f:
      f.write(data)
    os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
  with open(os.path.join(folder, "refs", "main"), "w") as f:
    f.write(REVISION)
  return snapshot


def safetensors_bytes(state: dict) -> bytes:
  return save({k: np.ascontiguousarray(v) for k, v in state.items()})


def offline_cache(monkeypatch, cache_dir) -> None:
  """HF_HUB_CACHE at `cache_dir` and HF_HUB_OFFLINE=1 (swinv2_jax.weights.hub reads both at
  each fetch)."""
  monkeypatch.setenv("HF_HUB_CACHE", os.fspath(cache_dir))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
