"""When a command re-executes itself with the tuned glibc malloc (llmtrain/allocator.py): glibc 2.35 or later, no
GLIBC_TUNABLES or malloc preload of the user's, and no GPU on the host (measured on CPU only), found without torch.
The re-exec itself and glibc's behaviour, in real processes: tests/integration/test_allocator_reexec.py."""

from __future__ import annotations

import pytest

from llmtrain import allocator

needs_glibc = pytest.mark.skipif(allocator.glibc_version() is None or allocator.glibc_version() < allocator.MIN_GLIBC,
                                 reason="glibc 2.35 or later only")


@needs_glibc
def test_wanted_on_a_cpu_host_unless_the_user_chose_an_allocator():
    assert allocator.wanted({}, gpu=False)
    assert not allocator.wanted({"GLIBC_TUNABLES": ""}, gpu=False)  # empty: glibc's defaults, by choice
    assert not allocator.wanted({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, gpu=False)


def test_a_gpu_host_keeps_glibcs_defaults():
    assert not allocator.wanted({}, gpu=True)


def test_a_gpu_is_found_by_the_drivers_files(tmp_path):
    gpus, device = tmp_path / "gpus", tmp_path / "nvidia0"
    gpus.mkdir()
    files = (str(gpus), str(device))
    assert not allocator.host_has_gpu({}, files)  # the driver's folder without a GPU in it
    (gpus / "0000:3b:00.0").mkdir()
    assert allocator.host_has_gpu({}, files)
    assert allocator.host_has_gpu({"CUDA_VISIBLE_DEVICES": "1"}, files)
    assert not allocator.host_has_gpu({"CUDA_VISIBLE_DEVICES": ""}, files)  # hidden: a CPU run
    assert not allocator.host_has_gpu({"CUDA_VISIBLE_DEVICES": "-1"}, files)
    assert allocator.host_has_gpu({}, (str(tmp_path / "none"), str(device))) is False
    device.touch()
    assert allocator.host_has_gpu({}, (str(tmp_path / "none"), str(device)))


def test_glibc_version_is_read():
    version = allocator.glibc_version()
    assert version is None or (len(version) == 2 and version >= (2, 0))


def test_a_zero0_run_or_one_on_a_gpu_host_does_not_re_execute(monkeypatch):
    def execv(*args):
        raise AssertionError("must not re-execute")

    monkeypatch.setattr(allocator.os, "execv", execv)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    allocator.use_tuned_malloc(0)
    monkeypatch.setattr(allocator, "host_has_gpu", lambda environ: True)
    allocator.use_tuned_malloc(3)
    assert "GLIBC_TUNABLES" not in allocator.os.environ


def test_a_sequence_parallel_run_re_executes_with_the_1_mib_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator.os, "execv", lambda *args: calls.append(allocator.os.environ["GLIBC_TUNABLES"]))
    monkeypatch.setattr(allocator, "wanted", lambda environ: True)
    for stage, sp in ((1, 1), (1, 2), (0, 2), (0, 1)):  # ZeRO-0 keeps glibc's defaults, but not under sequence parallel
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
        allocator.use_tuned_malloc(stage, sp)
    assert calls == ["glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304",
                     "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576",
                     "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576"]
