"""Process-wide XLA settings, applied when `lm` is imported (before JAX starts a backend).

XLA's CPU backend in jaxlib 0.10 hands dots, elementwise ops and reductions to YNNPACK.
On our training steps its elementwise and reduction fusions are slower than XLA's own
loops, while its dots are the fastest available: restricting YNNPACK to dots makes the
`char_lm:baby` step 1.3x faster and the GPT benchmark step a few per cent faster
(benchmarks/train_step.py, A/B on the same machine). The flag is experimental, and an
unknown flag aborts XLA at start-up, so it is set only for jaxlib versions it was measured
on, never over a value the user set, and not at all with `LM_XLA_DEFAULTS=0`.
Accelerator backends ignore CPU flags.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
TESTED_JAXLIB = ("0.10.",)  # version prefixes the flags are known (and measured) on


def jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def configure_xla(env: MutableMapping[str, str] = os.environ,
                  version: str | None = None) -> list[str]:
    """Adds our CPU flags to `env["XLA_FLAGS"]`; returns the flags added."""
    if env.get("LM_XLA_DEFAULTS", "1") == "0":
        return []
    version = jaxlib_version() if version is None else version
    if not version.startswith(TESTED_JAXLIB):
        return []
    flags = env.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if name not in flags]
    if added:
        env["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return added


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> list[str]:
    """This CPU's vector, bf16 and AMX feature flags (of CPU_FEATURES) from /proc/cpuinfo;
    empty where the file is absent. bf16 matmuls beat fp32 on the CPU only with
    avx512_bf16 / amx_bf16, so benchmarks print these beside every number."""
    try:
        with open(path) as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in CPU_FEATURES if f in flags]
