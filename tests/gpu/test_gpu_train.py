"""The same training runs on CUDA (NCCL, bf16/fp16, flash SDPA); skipped on machines without a GPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.integration.test_train import launch, losses

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def trained(run_dir: Path, data_dir: Path, ranks: int, *overrides: str) -> dict[int, float]:
    launch(run_dir, data_dir, ranks, *overrides)
    return losses(run_dir)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_single_gpu_training_learns(prepared_small, tmp_path, precision):
    got = trained(tmp_path / precision, prepared_small, 1, f"precision={precision}", "dist.zero_stage=2")
    assert all(v == v for v in got.values())
    assert got[max(got)] < got[1] - 0.5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_zero3_match_one(prepared_small, tmp_path):
    one = trained(tmp_path / "one", prepared_small, 1, "precision=fp32", "dist.zero_stage=0")
    two = trained(tmp_path / "two", prepared_small, 2, "precision=fp32", "dist.zero_stage=3")
    assert max(abs(one[s] - two[s]) / abs(one[s]) for s in one) <= 1e-3  # TF32 and NCCL reduction order


@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-3 compiles through DeepSpeed's DeepCompile
def test_compiled_gpu_training_tracks_eager(prepared_small, tmp_path, stage):
    eager = trained(tmp_path / "eager", prepared_small, 1, "precision=bf16", f"dist.zero_stage={stage}",
                    "train.compile=false")
    compiled = trained(tmp_path / "compiled", prepared_small, 1, "precision=bf16", f"dist.zero_stage={stage}",
                       "train.compile=true")
    assert compiled[max(compiled)] < compiled[1] - 0.5
    assert max(abs(eager[s] - compiled[s]) / abs(eager[s]) for s in eager) <= 2e-2  # bf16, fused kernels


def test_no_cpu_workaround_runs_on_a_gpu_host():
    """The workarounds were measured on CPU ranks only: on a CUDA host none is installed (llmtrain/workarounds.py)."""
    import os

    from llmtrain import allocator, workarounds
    from llmtrain.distributed.env import select_accelerator

    select_accelerator()
    assert allocator.host_has_gpu(os.environ) and not allocator.wanted(os.environ)
    assert not workarounds.on_cpu_accelerator()
    with workarounds.around_initialize(1), workarounds.around_initialize(3):
        from deepspeed.runtime.zero import stage_1_and_2

        assert not getattr(stage_1_and_2.all_gather_dp_groups, "gathers_by_broadcast", False)



def test_a_background_save_copies_device_tensors_into_pinned_host_buffers():
    """On a GPU the loop stops for a device-to-host copy into pinned buffers. Its files hold the same values; their
    storages are tagged "cpu" where a synchronous save tags them "cuda:0" (DeepSpeed loads both to the CPU first)."""
    import io

    from llmtrain.run.background import HostCopies

    flat = torch.randn(1000, device="cuda")
    state = {"flat": flat, "view": flat[10:20], "step": 3}
    copies = HostCopies()
    copies.begin()
    copied = copies.copy(state)
    assert copied["flat"].device.type == "cpu" and copied["flat"].is_pinned()
    assert copied["view"].untyped_storage().data_ptr() == copied["flat"].untyped_storage().data_ptr()
    buffer = io.BytesIO()
    torch.save(copied, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert torch.equal(loaded["flat"], flat.cpu()) and torch.equal(loaded["view"], flat[10:20].cpu())


@pytest.mark.parametrize("buffer_gb", ["null", "0"])
def test_background_saves_on_a_gpu_resume_the_run(prepared_small, tmp_path, buffer_gb):
    """The save of step 5 in the background: copied to pinned buffers (null) or written from the live device
    tensors while step 6 computes (0); the last save (step 10, written directly) is removed to resume from it."""
    whole = trained(tmp_path / "whole", prepared_small, 1, "precision=bf16", "dist.zero_stage=2")
    run_dir = tmp_path / "stopped"
    launch(run_dir, prepared_small, 1, "precision=bf16", "dist.zero_stage=2", "train.stop_at_step=10",
           "train.checkpoint_every=5", "train.keep_checkpoints=5", "train.checkpoint_async=true",
           f"train.checkpoint_buffer_gb={buffer_gb}")
    shutil.rmtree(run_dir / "checkpoints" / "step_00000010")
    resumed = trained(run_dir, prepared_small, 1, "precision=bf16", "dist.zero_stage=2")
    assert max(abs(whole[s] - resumed[s]) / abs(whole[s]) for s in range(6, max(whole) + 1)) <= 2e-2
