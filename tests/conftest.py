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
