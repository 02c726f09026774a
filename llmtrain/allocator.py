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

Under sequence parallel (``dist.sequence_parallel``) a rank frees smaller blocks: Ulysses' all-to-all moves each
layer's q, k and v in pieces of t/sp positions x heads/sp (1.5 MiB each at t=4096, sp=2, ``small`` in fp32), below
4 MiB, and glibc's heaps kept 0.45 GiB of them between steps; the pair's peak was 1.13 GiB per rank where 0.80 was
predicted. So those runs take a 1 MiB threshold (:func:`tunables`): peak 0.77 GiB, the same tokens/s within the
noise of 4 steps (``benchmarks/bench_train.py``, table 4). They take it at ZeRO-0 too, where glibc's defaults let
the pair's peak creep up step after step (0.84, 0.98, 1.01, 1.04 GiB at t=4096; tuned: 0.64, then 0.75-0.76 GiB
flat; 503-537 against 526-587 tokens/s).

At ZeRO-1 they help as much (350m: peak 6.43 -> 5.14 GiB, 14.0 -> 11.4 s per step; without them ZeRO-1 held more
than ZeRO-0), at ZeRO-2 they change little (5.30 -> 5.14 GiB, same s/step), but at ZeRO-0 they measured ~10%
slower (12.2 against 11.0 s per step). So they are used from ZeRO-1 on (:data:`MIN_ZERO_STAGE`).

All of that was measured on CPU ranks, none on a GPU host, where ZeRO gathers and frees its layers in GPU memory
(through torch's CUDA caching allocator, not glibc's): a host with a GPU keeps glibc's defaults (:func:`host_has_gpu`).
The re-exec runs before torch is imported, so the GPU is found without torch: by the files the NVIDIA driver makes
(``/proc/driver/nvidia/gpus/<bus id>``, ``/dev/nvidia0``) or ROCm's ``/dev/kfd``; where ``CUDA_VISIBLE_DEVICES`` is
set empty (or to -1) the run is a CPU run whatever the host holds. Files, not an environment variable of llmtrain's:
nothing to set on either kind of host, and ``GLIBC_TUNABLES=`` already opts out.

glibc reads its tunables once, as a process starts. So the command re-executes itself (same pid, same arguments,
before it imports torch; ~0.2 s) with ``GLIBC_TUNABLES`` set, and its children inherit it. A ``GLIBC_TUNABLES``
already in the environment is left as it is: ``GLIBC_TUNABLES=`` (empty) keeps glibc's defaults, and a process
preloading another allocator (``LD_PRELOAD=libjemalloc.so.2``) is not touched either.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmtrain.workarounds import Upstream, Workaround, usable

TUNED_MALLOC = Workaround(
    name="tuned glibc malloc (re-exec with GLIBC_TUNABLES)",
    works_around="glibc malloc raises its mmap threshold (up to 32 MiB) after the first large free, so the layers ZeRO "
                 "gathers and frees stay in fragmenting heaps: a rank grew to 1.95-2.1x the ZeRO formula (350m fp32, "
                 "ZeRO-3, 2 CPU ranks)",
    checked_with="glibc 2.36 (Debian 12), CPython 3.11, torch 2.13.0, deepspeed 0.19.8",
    runs_where="ZeRO >= 1 or sequence parallel on a host without a GPU, glibc >= 2.35, no GLIBC_TUNABLES or "
               "malloc LD_PRELOAD of the user's",
    upstream=(Upstream("sys:orig_argv"),))  # the re-exec repeats the interpreter's own arguments (Python 3.10+)
GPU_FILES = ("/proc/driver/nvidia/gpus", "/dev/nvidia0", "/dev/kfd")  # NVIDIA's driver; ROCm's (torch's "cuda")

TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304"
SEQUENCE_PARALLEL_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576"
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


def host_has_gpu(environ: dict[str, str] | os._Environ, files: tuple[str, ...] = GPU_FILES) -> bool:
    """Whether this process sees a CUDA or ROCm GPU, found without importing torch (see above)."""
    if environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    for name in files:
        path = Path(name)
        try:
            if path.is_dir() and any(path.iterdir()) or not path.is_dir() and path.exists():
                return True
        except OSError:  # listed but unreadable: a GPU host all the same
            return True
    return False


def wanted(environ: dict[str, str] | os._Environ, gpu: bool | None = None) -> bool:
    """Whether a process with ``environ`` (on a host with a ``gpu``: None finds out) should re-execute itself with
    :data:`TUNABLES`."""
    if "GLIBC_TUNABLES" in environ or "LD_PRELOAD" in environ and "malloc" in environ["LD_PRELOAD"]:
        return False
    if host_has_gpu(environ) if gpu is None else gpu:
        return False  # measured on CPU only
    version = glibc_version()
    return version is not None and version >= MIN_GLIBC and usable(TUNED_MALLOC)


def tunables(sequence_parallel: int) -> str:
    """The GLIBC_TUNABLES of a run: :data:`TUNABLES`, or under sequence parallel the 1 MiB threshold (see above)."""
    return SEQUENCE_PARALLEL_TUNABLES if sequence_parallel > 1 else TUNABLES


def use_tuned_malloc(zero_stage: int, sequence_parallel: int = 1) -> None:
    """For a run at ``zero_stage`` (and ``sequence_parallel``): re-execute this process with :func:`tunables` when
    :func:`wanted` from :data:`MIN_ZERO_STAGE` on, or under sequence parallel (:data:`TUNED_MALLOC`); return when it
    is already set up or keeps glibc's defaults."""
    if zero_stage < MIN_ZERO_STAGE and sequence_parallel == 1 or not wanted(os.environ):
        return
    os.environ["GLIBC_TUNABLES"] = tunables(sequence_parallel)
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # cannot re-execute (no executable path): run on with glibc's defaults
        del os.environ["GLIBC_TUNABLES"]
