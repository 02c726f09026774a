"""Faults an operator meets, injected for real: the launcher killed under its ranks, two runs on one run.dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO
from tests.integration.conftest import COMMON, launch, losses

pytestmark = pytest.mark.slow  # every test here starts processes (the CLI, ranks) or reads a run that did


def start(run_dir: Path, data_dir: Path, ranks: int, *overrides: str) -> subprocess.Popen:
    args = [f"data.dir={data_dir}", f"run.dir={run_dir}", *COMMON, "precision=fp32", *overrides]
    cmd = [str(BIN / "llmtrain-train"), *args] if ranks == 1 else [
        str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m", "llmtrain.cli.train", *args]
    log = open(f"{run_dir}.log", "w")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, Path(f"{run_dir}.log").read_text()[-2000:]
        if max(losses(run_dir) if (run_dir / "metrics.jsonl").is_file() else [0]) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except OSError:
        return False
    return "Z" not in state.split()[1]  # a zombie has stopped; whoever reaps it is not our concern


def test_ranks_die_with_their_killed_launcher_and_the_rerun_takes_over(prepared_small, tmp_path):
    run_dir = tmp_path / "orphans"
    agent = start(run_dir, prepared_small, 2, "dist.zero_stage=2", "train.max_steps=100000",
                  "train.checkpoint_every=4")
    wait_for_step(run_dir, 6, agent)
    ranks = children(agent.pid)
    assert len(ranks) == 2 and all(alive(p) for p in ranks)
    os.kill(agent.pid, signal.SIGKILL)  # the agent only: its ranks run in the same session but get no signal
    killed = time.time()
    while any(alive(p) for p in ranks) and time.time() - killed < 30:
        time.sleep(0.05)
    gone_after = time.time() - killed
    assert gone_after < 10, f"ranks still alive {gone_after:.1f} s after their launcher was killed"
    written = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    time.sleep(3)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == written  # nothing more was written
    print(f"ranks gone {gone_after:.2f} s after the launcher was killed")
    # the dead run's lock is taken over by the next run, which resumes from the last complete checkpoint
    last = max(int(json.loads(m.read_text())["step"]) for m in run_dir.glob("checkpoints/step_*/COMPLETE.json"))
    rerun = launch(run_dir, prepared_small, 2, "precision=fp32", "dist.zero_stage=2", f"train.max_steps={last + 2}")
    assert "taking over" in rerun.stderr and f"(step {last}, saved on 2 ranks)" in rerun.stderr


def test_a_second_run_on_the_same_run_dir_is_refused_and_changes_nothing(prepared_small, tmp_path):
    run_dir = tmp_path / "shared"
    # long enough that the first run still holds the folder when the second has started up, even on a busy machine
    first = start(run_dir, prepared_small, 1, "train.max_steps=200", "train.checkpoint_every=50")
    wait_for_step(run_dir, 3, first)
    holder = json.loads((run_dir / "LOCK").read_text())
    started = time.time()
    second = launch(run_dir, prepared_small, 1, "precision=fp32", check=False)
    refused_after = time.time() - started
    assert second.returncode == 2, second.stderr[-2000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"llmtrain-train: error: {run_dir} is in use by another run (host ")
    assert f"pid {holder['pid']}" in last and "Traceback" not in second.stderr
    os.kill(first.pid, signal.SIGTERM)  # the first run stops at the next step, with a checkpoint
    assert first.wait(timeout=300) == 0, Path(f"{run_dir}.log").read_text()[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] < 200  # one run's rows, none interleaved
    assert not (run_dir / "LOCK").exists()  # released at the end
    print(f"second run refused in {refused_after:.1f} s")


def halve(shard: Path) -> str:
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a write the disk lost half of
    return f"{shard.name} has {shard.stat().st_size:,} bytes"


def flip_bytes(shard: Path) -> str:
    raw = bytearray(shard.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0xFF  # bit rot at the same size: torch.load would read it as garbage weights
    shard.write_bytes(bytes(raw))
    return f"{shard.name} fails its checksum"


@pytest.mark.parametrize("damage", [halve, flip_bytes])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(run, prepared_small, tmp_path, damage):
    reference = losses(run("z2-2ranks", 2, "precision=fp32", "dist.zero_stage=2"))
    run_dir = tmp_path / "fallback"
    launch(run_dir, prepared_small, 2, "precision=fp32", "dist.zero_stage=2", "train.checkpoint_every=5",
           "train.stop_at_step=10")
    newest = run_dir / "checkpoints" / "step_00000010"
    reported = damage(next(newest.glob("*optim_states.pt")))
    resumed = launch(run_dir, prepared_small, 2, "precision=fp32", "dist.zero_stage=2")
    assert reported in resumed.stderr
    assert "resumed from" in resumed.stderr and "step_00000005 (step 5" in resumed.stderr
    assert (run_dir / "checkpoints" / "step_00000010.corrupt").is_dir()  # set aside, not deleted
    got = losses(run_dir)
    assert [got[s] for s in range(6, 21)] == [reference[s] for s in range(6, 21)]  # bitwise, on every rank


def test_a_full_disk_stops_the_save_in_one_line_and_keeps_the_older_checkpoints(prepared_small, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        run_dir = disk / "run"
        proc = launch(run_dir, prepared_small, 1, "precision=fp32", "train.checkpoint_every=2",
                      "train.keep_checkpoints=10", check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"llmtrain-train: error: no space left on device: {run_dir}/checkpoints/step_"), last
        assert "MB are free; the older checkpoints are kept" in last and "Traceback" not in proc.stderr
        folders = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert folders and all((run_dir / "checkpoints" / f / "COMPLETE.json").is_file() for f in folders)
        print(f"disk full after {len(folders)} checkpoint(s): {last}")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_run_refused_during_set_up_leaves_no_empty_run_dir(prepared_small, tmp_path):
    proc = launch(tmp_path / "refused", prepared_small, 1, "precision=fp32", "model.vocab_size=512", check=False)
    assert proc.returncode == 2 and "model.vocab_size=512 but the tokenizer of" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
    kept = tmp_path / "kept"
    kept.mkdir()  # a folder the user made is never removed
    assert launch(kept, prepared_small, 1, "precision=fp32", "model.vocab_size=512", check=False).returncode == 2
    assert kept.is_dir()


def test_sigkill_at_random_steps_then_rerun_equals_the_uninterrupted_run(run, prepared_small, tmp_path):
    import random

    reference = losses(run("z2-2ranks", 2, "precision=fp32", "dist.zero_stage=2"))
    run_dir = tmp_path / "killed"
    kills = sorted(random.Random(2026).sample(range(4, 18), 2))
    for step in kills:
        job = start(run_dir, prepared_small, 2, "dist.zero_stage=2", "train.checkpoint_every=3",
                    "train.checkpoint_async=false")  # synchronous saves here; background ones in the next test
        wait_for_step(run_dir, step, job)
        os.killpg(job.pid, signal.SIGKILL)  # the whole job, launcher and ranks, without warning
        job.wait()
    last = launch(run_dir, prepared_small, 2, "precision=fp32", "dist.zero_stage=2", "train.checkpoint_every=3")
    assert "resumed from" in last.stderr
    got = losses(run_dir)  # a step logged again after a resume keeps its last value
    assert got == reference, (kills, {s: (got.get(s), reference[s]) for s in reference if got.get(s) != reference[s]})


def half_written(run_dir: Path) -> list[Path]:
    folders = (run_dir / "checkpoints").glob("step_*[0-9]")
    return [f for f in folders if f.is_dir() and not (f / "COMPLETE.json").exists()]


def test_sigkill_inside_a_save_then_rerun_equals_the_uninterrupted_run(run, prepared_small, tmp_path):
    reference = losses(run("z2-2ranks", 2, "precision=fp32", "dist.zero_stage=2"))
    run_dir = tmp_path / "killed-saving"
    for attempt in range(3):  # a save takes tens of ms: poll for one under way, kill the job right then
        # a background save: the files being written while the next steps train, its marker not yet there
        job = start(run_dir, prepared_small, 2, "dist.zero_stage=2", "train.checkpoint_every=1",
                    "train.checkpoint_async=true")
        wait_for_step(run_dir, 4 + 4 * attempt, job)  # complete checkpoints exist to resume from
        deadline = time.time() + 180
        while not half_written(run_dir) and job.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        caught = half_written(run_dir)
        if caught:
            break
    assert caught, "no kill landed inside a save in 3 attempts"
    print(f"killed inside the save of {caught[0].name} (attempt {attempt + 1}), files: "
          f"{sorted(p.name for p in caught[0].iterdir())}")
    last = launch(run_dir, prepared_small, 2, "precision=fp32", "dist.zero_stage=2", "train.checkpoint_every=1")
    assert "resumed from" in last.stderr and not half_written(run_dir)  # the half-written folder is pruned
    got = losses(run_dir)
    assert got == reference, {s: (got.get(s), reference[s]) for s in reference if got.get(s) != reference[s]}
