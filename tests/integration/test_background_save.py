"""train.checkpoint_async=true for real, on 2 ranks: the files it writes are the synchronous save's byte for byte,
and a stop signal that arrives while a save is being written finishes that save before the final one."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.faults.test_launcher_and_lock import children, half_written, start, wait_for_step
from tests.integration.conftest import launch, losses

pytestmark = pytest.mark.slow  # every test here starts processes (ranks)

BUFFER_GB = 0.0002
ZERO3 = ["precision=fp32", "dist.zero_stage=3", "train.checkpoint_every=3", "train.keep_checkpoints=10"]


def tensor_files(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.glob("checkpoints/*/*.pt")}


def test_background_saves_write_the_synchronous_files_byte_for_byte(prepared_small, tmp_path):
    written = {}
    # a buffer that holds a rank's module file and not its optimizer partition: each save copies the one and leaves
    # the other live, read by the writer while the next step's forward and backward run
    for background in ("true", "false"):
        run_dir = tmp_path / f"async-{background}"
        proc = launch(run_dir, prepared_small, 2, *ZERO3, f"train.checkpoint_async={background}",
                      f"train.checkpoint_buffer_gb={BUFFER_GB}")
        written[background] = tensor_files(run_dir)
        assert proc.stderr.count("the loop stopped") == (6 if background == "true" else 0)
    # 7 checkpoints (steps 3, 6, ..., 18 and 20; the last one written directly), each with ZeRO-3's per-rank files:
    # the host buffers of one save are reused by the next, and every save is still the synchronous one
    assert len({name.split("/")[1] for name in written["true"]}) == 7 and len(written["true"]) >= 14
    assert written["true"].keys() == written["false"].keys()
    sizes = {name.split("/")[2].split("_mp_rank_00_")[1]: len(data) for name, data in written["true"].items()}
    assert sizes["model_states.pt"] < BUFFER_GB * 2**30 < sizes["optim_states.pt"]
    assert all(written["true"][name] == written["false"][name] for name in written["true"])


def test_a_stop_signal_during_a_background_save_finishes_it_then_saves_the_last_step(run, prepared_small, tmp_path):
    reference = losses(run("z2-2ranks", 2, "precision=fp32", "dist.zero_stage=2"))
    run_dir = tmp_path / "stopped"
    job = start(run_dir, prepared_small, 2, "dist.zero_stage=2", "train.checkpoint_every=1",
                "train.keep_checkpoints=50")
    wait_for_step(run_dir, 3, job)
    deadline = time.time() + 60
    while not half_written(run_dir) and job.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    in_flight = half_written(run_dir)
    for rank in children(job.pid):  # what a scheduler sends the ranks before it takes the nodes back
        os.kill(rank, signal.SIGTERM)
    assert job.wait(timeout=120) == 0, Path(f"{run_dir}.log").read_text()[-3000:]
    assert in_flight and not half_written(run_dir)  # the save in flight was completed, not left behind
    complete = sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoints/step_*/COMPLETE.json"))
    assert complete == list(range(1, complete[-1] + 1)) and complete[-1] < 20
    rerun = launch(run_dir, prepared_small, 2, "precision=fp32", "dist.zero_stage=2")
    assert f"(step {complete[-1]}, saved on 2 ranks)" in rerun.stderr
    got = losses(run_dir)
    assert got == reference, {s: (got.get(s), reference[s]) for s in reference if got.get(s) != reference[s]}
