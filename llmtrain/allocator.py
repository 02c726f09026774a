"""The host allocator a ZeRO run uses: glibc's malloc, tuned so that freed layers leave the process.

ZeRO-3 gathers each layer's weights and frees them again two or three times a step. glibc serves allocations below
its mmap threshold from its heaps and keeps them there when they are freed; the threshold rises (to 32 MiB) the
first time a large block is freed, so from then on most tensors land in the heaps, which fragment. Measured at
``350m`` fp32, ZeRO-3, 2 CPU ranks (``benchmarks/bench_train.py``, table 3): a rank's resident memory grew step
after step, to 1.95-2.1x the ZeRO formula. Two glibc tunables end that:

- ``glibc.malloc.mmap_threshold=4194304``: every block of 4 MiB or more gets its own mapping, returned to the system
  by ``free``; the threshold stays fixed. Peak 1.26x the formula, but alone it costs 30% of a step in page faults
  (each gathered layer is new memory to the kernel).
- ``glibc.malloc.hugetlb=1`` (glibc 2.35 and later): those mappings ask for transparent huge pages, 512 times fewer
  faults. Together: 11.6-11.7 s per step against 11.1-12.3 s with glibc's defaults, and the same losses.

At ZeRO-1 they help as much (350m: peak 6.43 -> 5.14 GiB, 14.0 -> 11.4 s per step; without them ZeRO-1 held more
than ZeRO-0), at ZeRO-2 they change little (5.30 -> 5.14 GiB, same s/step), but at ZeRO-0 they measured ~10%
slower (12.2 against 11.0 s per step). So they are used from ZeRO-1 on (:data:`MIN_ZERO_STAGE`).

glibc reads its tunables once, as a process starts. So the command re-executes itself (same pid, same arguments,
before it imports torch; ~0.2 s) with ``GLIBC_TUNABLES`` set, and its children inherit it. A ``GLIBC_TUNABLES``
already in the environment is left as it is: ``GLIBC_TUNABLES=`` (empty) keeps glibc's defaults, and a process
preloading another allocator (``LD_PRELOAD=libjemalloc.so.2``) is not touched either.
"""

from __future__ import annotations

import os
import sys

TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304"
MIN_ZERO_STAGE = 1  # ZeRO-0 keeps glibc's defaults (see above)
MIN_GLIBC = (2, 35)  # the first with glibc.malloc.hugetlb; without it the threshold alone would slow ZeRO-3 down


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the glibc this process runs on, or None (another libc, or not Linux)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def wanted(environ: dict[str, str] | os._Environ) -> bool:
    """Whether a process with ``environ`` should re-execute itself with :data:`TUNABLES`."""
    if "GLIBC_TUNABLES" in environ or "LD_PRELOAD" in environ and "malloc" in environ["LD_PRELOAD"]:
        return False
    version = glibc_version()
    return version is not None and version >= MIN_GLIBC


def use_tuned_malloc(zero_stage: int) -> None:
    """For a run at ``zero_stage``: re-execute this process with :data:`TUNABLES` when :func:`wanted` from
    :data:`MIN_ZERO_STAGE` on; return when it is already set up or keeps glibc's defaults."""
    if zero_stage < MIN_ZERO_STAGE or not wanted(os.environ):
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # cannot re-execute (no executable path): run on with glibc's defaults
        del os.environ["GLIBC_TUNABLES"]
