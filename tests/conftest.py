"""Session-wide test setup.

XLA reads the host device count once, when jax first initialises its CPU backend, so the
fake 8-device CPU platform must be requested before any test module imports jax. Tests that
want a single device build a 1-device mesh explicitly.
"""

import os
import sys

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# Make `import lm` work from a plain `pytest` run in the checkout (the editable install may
# predate the package's __init__.py).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Identical programs compiled by several tests (a run and its resumed copy, the same model in
# two tests) are compiled once per test session: JAX's persistent compilation cache in a
# directory of this session's own, shared by its xdist workers (they inherit the variable)
# and removed when the session ends, so no test depends on what an earlier session left.
# LM_TEST_COMPILATION_CACHE=0 turns it off.
_OWN_CACHE = False
if os.environ.get("LM_TEST_COMPILATION_CACHE", "1") != "0":
    import tempfile

    import jax

    if not os.environ.get("LM_TEST_JAX_CACHE_DIR"):
        os.environ["LM_TEST_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="lm-test-jax-cache-")
        _OWN_CACHE = True
    jax.config.update("jax_compilation_cache_dir", os.environ["LM_TEST_JAX_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(os.environ["LM_TEST_JAX_CACHE_DIR"], ignore_errors=True)
