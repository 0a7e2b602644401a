"""Huge pages for XLA's host buffers: the entry points re-execute themselves once with glibc's
tunable, and glibc then backs large allocations with transparent huge pages."""

import os
import re
import subprocess
import sys

import pytest

from swinv2_jax import hugepages

pytestmark = pytest.mark.skipif(not hugepages.possible(),
                                reason="needs glibc and transparent huge pages")

# Allocates and fills 64 MiB through malloc (numpy would ask for huge pages itself) and reports
# GLIBC_TUNABLES, the pid and the huge pages the process holds.
_PROBE = """
import ctypes, os, re, sys
from swinv2_jax import hugepages
print("pid-before", os.getpid(), flush=True)
hugepages.ensure()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 * 2**20
ctypes.memset(libc.malloc(size), 1, size)
rollup = open("/proc/self/smaps_rollup").read()
print("pid", os.getpid())
print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
print("huge_kb", re.search(r"AnonHugePages:\\s+(\\d+)", rollup).group(1))
"""


def _probe(tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       check=True).stdout
  fields = dict(line.split(" ", 1) if " " in line else (line, "") for line in out.splitlines())
  return fields, out


def test_reexecuted_once_with_the_tunable_and_huge_pages_back_large_buffers():
  fields, out = _probe(None)
  assert out.count("pid-before") == 2  # the re-executed process ran the probe from the top
  assert fields["pid"] == fields["pid-before"]  # execve: same process, for launchers' signals
  assert fields["tunables"] == hugepages.TUNABLE
  assert int(fields["huge_kb"]) >= 32 * 1024  # most of the 64 MiB in 2 MiB pages


def test_other_tunables_are_kept():
  fields, _ = _probe("glibc.malloc.arena_max=2")
  assert fields["tunables"] == "glibc.malloc.arena_max=2:" + hugepages.TUNABLE


def test_a_choice_already_made_is_left_alone():
  fields, out = _probe("glibc.malloc.hugetlb=0")
  assert out.count("pid-before") == 1 and fields["tunables"] == "glibc.malloc.hugetlb=0"
  assert int(fields["huge_kb"]) < 32 * 1024  # off means off


@pytest.mark.parametrize("tunables, runs", [(None, 2), ("glibc.malloc.hugetlb=0", 1)])
def test_main_reexecutes_before_its_imports(tunables, runs):
  """`python -m swinv2_jax.main`: with -X importtime each process lists its imports, so the
  re-executed run imports hugepages twice, then reports a mistake as usual."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables:
    env["GLIBC_TUNABLES"] = tunables
  proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "swinv2_jax.main",
                         "--config=configs/no_such_config.py", "--workdir=unused"], env=env,
                        capture_output=True, text=True)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: " in proc.stderr and "no_such_config.py" in proc.stderr
  assert len(re.findall(r"\| swinv2_jax\.hugepages$", proc.stderr, re.M)) == runs
