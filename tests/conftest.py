"""Shared test setup: a persistent XLA compilation cache, so the many small trainers and
models the suite builds compile once per program shape (the CI machine has 2 cores); and the
shared helpers (tests/helpers.py: ROOT, load_config), which scripts started by the tests
import as well."""

import os
import tempfile

import jax

from helpers import ROOT, load_config  # noqa: F401  (tests/ is on sys.path under pytest)

_CACHE = os.environ.get("SWINV2_TEST_COMPILE_CACHE",
                        os.path.join(tempfile.gettempdir(), "swinv2_jax_test_xla_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
