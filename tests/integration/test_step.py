"""The optimizer step itself: one read back to the host per step, and train.compile (same losses, no recompiling,
checkpoints interchangeable with eager runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO
from tests.integration.conftest import STEPS, launch, losses
from tests.integration.test_train import rel_diff

pytestmark = pytest.mark.slow  # every test here starts processes (the CLI, ranks) or reads a run that did

PROBE = Path(__file__).with_name("step_probe.py")


def probe(data: Path, run_dir: Path, stage: int, compiled: bool, steps: int, ranks: int = 1) -> dict:
    args = [str(PROBE), str(data), str(run_dir), str(stage), "true" if compiled else "false", str(steps)]
    cmd = [sys.executable, *args] if ranks == 1 else [str(BIN / "torchrun"), "--standalone",
                                                      f"--nproc_per_node={ranks}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", [0, 2])
def test_one_read_back_to_the_host_per_step(prepared_small, tmp_path, stage):
    steps = probe(prepared_small, tmp_path / "run", stage, False, 4)["steps"]
    # llmtrain's own code waits for the device once per step: the packed [loss, stop signals, norm] read
    assert [s["reads"]["llmtrain"] for s in steps] == [1, 1, 1, 1]
    assert all(s["reads"]["other"] == 0 for s in steps)
    if stage == 0:  # DeepSpeed's plain data-parallel path adds none (ZeRO 1-2 check for overflow: its own reads)
        assert all(s["reads"]["deepspeed"] == 0 for s in steps)


def test_compiled_steps_match_eager_and_compile_once(prepared_small, tmp_path):
    """On 2 ranks at ZeRO-2 (one process compiles alike: the compiled-checkpoint tests below run it)."""
    eager = probe(prepared_small, tmp_path / "eager", 2, False, 10, 2)
    compiled = probe(prepared_small, tmp_path / "compiled", 2, True, 10, 2)
    a = {s["step"]: s["loss"] for s in eager["steps"]}
    b = {s["step"]: s["loss"] for s in compiled["steps"]}
    assert rel_diff(b, a, range(1, 11)) <= 1e-4, (a, b)
    graphs = [s["graphs"] for s in compiled["steps"]]
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 10, graphs  # compiled at step 1, never again
    assert all(s["graphs"] == 0 for s in eager["steps"])
    # the checkpoint names are the eager module's
    assert compiled["saved_names"] == eager["saved_names"] and compiled["saved_names"]
    assert not any("_orig_mod" in name for name in compiled["saved_names"])


@pytest.mark.parametrize(("first", "then"), [("true", "false"), ("false", "true")])
def test_compiled_and_eager_checkpoints_resume_each_other(run, prepared_small, tmp_path, first, then):
    reference = losses(run("z0-1rank", 1, "precision=fp32", "dist.zero_stage=0"))
    run_dir = tmp_path / "run"
    launch(run_dir, prepared_small, 1, "precision=fp32", "dist.zero_stage=0", f"train.compile={first}",
           "train.stop_at_step=10")
    launch(run_dir, prepared_small, 1, "precision=fp32", "dist.zero_stage=0", f"train.compile={then}")
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert rel_diff(resumed, reference, range(1, STEPS + 1)) <= 1e-4, (resumed, reference)
    if first == "true":  # and the compiled run's checkpoint generates
        proc = subprocess.run([str(BIN / "llmtrain-generate"), f"run.dir={run_dir}", "prompt=def ",
                               "max_new_tokens=8", "temperature=0"], capture_output=True, text=True, timeout=300,
                              cwd=REPO)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
