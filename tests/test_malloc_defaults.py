"""lm.runtime.configure_malloc: a large buffer freed by a worker thread is reused by the
next allocation (no fresh mapping whose pages fault in again), and the switch turns it off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, resource, threading
import lm  # noqa: F401  (applies the malloc settings)

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 100 << 20  # above a worker arena's 64 MB heap
faults = []

def work():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(ctypes.c_void_p(p))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

t = threading.Thread(target=work)
t.start()
t.join()
print(faults[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.parametrize("defaults", ["1", "0"])
def test_a_worker_threads_large_buffer_is_reused(defaults):
    env = {**os.environ, "LM_MALLOC_DEFAULTS": defaults, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, check=True)
    faults = int(out.stdout.split()[-1])
    if defaults == "1":
        assert faults < 1000, faults  # reused: its pages are already mapped
    else:
        assert faults > 20000, faults  # a fresh 100 MB mapping: 25,600 pages fault in
