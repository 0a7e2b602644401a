"""Peak throughput of the accelerators the project knows, for MFU and the plan's wall time.

Standard library only: `python -m swinv2_jax.benchmark` imports it before JAX may start.
"""

from __future__ import annotations

import re

# Dense bf16 peak TFLOP/s per device (vendor figures), for MFU and the plan's wall-time estimate.
ACCELERATORS = {"a100-40g": 312.0, "a100-80g": 312.0, "h100": 989.0, "h200": 989.0,
                "v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}

# Device kinds (jax.devices()[0].device_kind) -> keys of ACCELERATORS, first match wins
# (an H100 PCIe counts as the SXM part's 989 TFLOP/s: --peak_tflops=756 for its own figure).
DEVICE_KINDS = (
    (r"h200", "h200"),
    (r"h100", "h100"),
    (r"a100.*80", "a100-80g"),
    (r"a100", "a100-40g"),
    (r"tpu v4", "v4"),
    (r"tpu v5 ?(lite|e)", "v5e"),
    (r"tpu v5", "v5p"),
    (r"tpu v6", "v6e"),
)


def accelerator_key(device_kind: str) -> str | None:
  """'NVIDIA H100 80GB HBM3' -> 'h100'; None for a kind without a known peak (CPU)."""
  kind = device_kind.lower()
  for pattern, key in DEVICE_KINDS:
    if re.search(pattern, kind):
      return key
  return None


def peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of one device of this kind; None where it is not known (CPU)."""
  key = accelerator_key(device_kind)
  return None if key is None else ACCELERATORS[key]
