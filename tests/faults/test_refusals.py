"""Refusals that end a run through the real CLI: one line from the main process, the same exit code on every rank,
no traceback; a refusal that lasts until the user says what to do; a diverged run's truthful line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, run_cli
from tests.integration.conftest import launch

pytestmark = pytest.mark.slow  # every test here starts processes (the CLI, ranks)

FAST = ["model=tiny", "precision=fp32", "train.max_steps=4", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.log_every=1", "train.eval_every=2", "train.eval_windows=8", "train.checkpoint_every=2",
        "optim.warmup_steps=2"]


def ranks(run_dir: Path, data_dir: Path, world: int, *overrides: str) -> list[subprocess.CompletedProcess]:
    """Each rank as its own process with the launcher's variables (as srun starts them): each one's own stderr
    and exit code, and no launcher's report of a failed job in between."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(BIN / "llmtrain-train"), f"data.dir={data_dir}", f"run.dir={run_dir}", *FAST, *overrides]
    procs = [subprocess.Popen(args, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for r in range(world)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def one_line_from_rank_0(done: list[subprocess.CompletedProcess], code: int) -> str:
    """Every rank exited ``code`` without a traceback; only rank 0 printed an error line: it."""
    for proc in done:
        assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [[line for line in p.stderr.splitlines() if line.startswith("llmtrain-train: error: ")] for p in done]
    assert len(errors[0]) == 1 and not any(errors[1:]), errors
    assert done[0].stderr.strip().splitlines()[-1] == errors[0][0]
    return errors[0][0]


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_all_checkpoints_damaged_is_refused_on_every_rank_until_restart(prepared_small, tmp_path):
    run_dir = tmp_path / "run"
    first = ranks(run_dir, prepared_small, 2)
    assert [p.returncode for p in first] == [0, 0], first[0].stderr[-3000:]
    val_loss = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    # a finished run, re-run: nothing to train; the val loss its metrics hold, not nan
    again = ranks(run_dir, prepared_small, 2)
    assert [p.returncode for p in again] == [0, 0], again[0].stderr[-3000:]
    assert f"step 4: val_loss {val_loss:.4f} (ppl " in again[0].stdout, again[0].stdout
    for shard in run_dir.glob("checkpoints/step_*/mp_rank_00_model_states.pt"):
        cut_in_half(shard)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file())

    line = one_line_from_rank_0(ranks(run_dir, prepared_small, 2), 2)
    print(line)
    assert line == (f"llmtrain-train: error: every checkpoint in {run_dir}/checkpoints is damaged "
                    f"(step_00000002.corrupt, step_00000004.corrupt; each kept, recorded in {run_dir}/DAMAGED.json); "
                    "run.resume=restart "
                    "starts over in this folder (its old files moved aside, none deleted), or use a new run.dir")
    kept = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file())
    assert [str(p).replace(".corrupt", "") for p in kept if p.name != "DAMAGED.json"] == [str(p) for p in before]

    line = one_line_from_rank_0(ranks(run_dir, prepared_small, 2), 2)  # the same command again: refused again
    print(line)
    assert line.startswith(f"llmtrain-train: error: every checkpoint in {run_dir}/checkpoints was found damaged "
                           f"(step_00000002.corrupt, step_00000004.corrupt; {run_dir}/DAMAGED.json written ")
    assert line.endswith("run.resume=restart starts over in this folder (its old files moved aside, none deleted), "
                         "or use a new run.dir")

    restarted = ranks(run_dir, prepared_small, 2, "run.resume=restart")
    assert [p.returncode for p in restarted] == [0, 0], restarted[0].stderr[-3000:]
    aside = run_dir / "previous" / "1"
    said = [line for line in restarted[0].stderr.splitlines() if "run.resume=restart" in line]
    print(said)
    assert len(said) == 1 and said[0].endswith(
        f"run.resume=restart: starting at step 0; the earlier history (DAMAGED.json, checkpoints, config.yaml, "
        f"metrics.jsonl) was moved to {aside}")
    assert sorted(p.relative_to(aside) for p in aside.rglob("*") if p.is_file()) == kept  # all of it, unchanged
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # one history, from step 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_a_diverged_run_exits_3_with_one_truthful_line(prepared_small, tmp_path, checkpoint_every):
    # fp32 without clipping at a huge learning rate: after one update every gradient is non-finite
    run_dir = tmp_path / "diverged"
    proc = launch(run_dir, prepared_small, 1, *FAST, "train.max_steps=20", f"train.checkpoint_every={checkpoint_every}",
                  "optim.lr=1e6", "optim.grad_clip=0", check=False, common=[])
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    print(line)
    assert line.startswith("llmtrain-train: error: steps 2-6 had a non-finite loss or gradient and were skipped "
                           "(train.max_nonfinite_steps=5 in a row): stopping; ")
    if checkpoint_every:
        assert line.endswith(f"the newest checkpoint is {run_dir}/checkpoints/step_00000005 (step 5, saved during "
                             "these steps, whose updates were skipped): lower optim.lr or check the data, then re-run "
                             "to continue from it")
    else:
        assert line.endswith(f"no checkpoint was saved in {run_dir}/checkpoints: lower optim.lr or check the data, "
                             "then re-run (it starts at step 0)")
        assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize(("launch_flags", "overrides", "refusal"), [
    (["--nproc_per_node", "2"], ["dist.tensor_parallel=3"],
     "dist.tensor_parallel=3 does not divide model.n_head=2: each rank takes whole heads; dist.tensor_parallel=3 "
     "does not divide the MLP width 256 (this job: 2 rank(s), 2 per node x 1 node(s))"),
    (["--nproc_per_node=3", "--nnodes=1:2"], ["train.global_batch_size=12"],
     "on 6 rank(s) (3 per node x 2 node(s)): train.global_batch_size=12 is not divisible by "
     "train.micro_batch_size=4 x 6 data-parallel ranks = 24; choose a multiple of 24"),
    (["--nproc_per_node", "2", "--device-memory-gb", "0.05"], ["model=small"],
     "on 2 rank(s) (2 per node x 1 node(s)): 11,113,344 parameters need 0.2 GB of model states per rank, more than "
     "the 0.1 GB of the device"),
    (["--nproc_per_node", "3"], ["dist.expert_parallel=2", "model.n_experts=4"],
     "on 3 rank(s) (3 per node x 1 node(s)): dist.expert_parallel=2 does not divide the 3 data-parallel rank(s)"),
])
def test_check_refuses_a_layout_before_any_rank_starts(prepared_small, tmp_path, launch_flags, overrides, refusal):
    proc = run_cli("llmtrain-train", "--check", *launch_flags, f"data.dir={prepared_small}",
                   f"run.dir={tmp_path / 'run'}", *FAST, *overrides)
    errors = [line for line in proc.stderr.splitlines() if "llmtrain-train: error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and refusal in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()  # nothing started, nothing written


def test_check_prints_the_grid_and_memory_of_every_world_size(prepared_small, tmp_path):
    proc = run_cli("llmtrain-train", "--check", "--nproc_per_node", "2", "--nnodes", "1:2",
                   f"data.dir={prepared_small}", f"run.dir={tmp_path / 'run'}", *FAST, "dist.zero_stage=2",
                   "train.micro_batch_size=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "model tiny: 0.17M parameters, 2 blocks, vocabulary 1,024" in out  # the data's vocabulary
    assert "2 rank(s) = 2 data x 1 tensor x 1 sequence parallel" in out and "4 rank(s) = 4 data" in out
    assert "global batch 8 = 2 micro x 2 accumulation x 2 data-parallel ranks" in out
    assert "global batch 8 = 2 micro x 1 accumulation x 4 data-parallel ranks" in out
    assert out.count("memory per rank, predicted:") == 2
    assert "the target device's memory is unknown here" in out  # no GPU here, and none given
    assert not (tmp_path / "run").exists()


def test_check_of_joining_workers_takes_the_jobs_layout(prepared_small, tmp_path):
    proc = run_cli("llmtrain-train", "--check", "--nproc_per_node", "1", f"data.dir={prepared_small}",
                   f"run.dir={tmp_path / 'run'}", *FAST, "mode=async_ps", "ps.transport=grpc", "ps.join=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 more worker(s) for the job in run.dir=" in proc.stdout


def test_the_launch_script_refuses_a_layout_in_one_line_without_starting_torchrun(prepared_small, tmp_path):
    proc = subprocess.run(["bash", "scripts/torchrun.sh", f"data.dir={prepared_small}", f"run.dir={tmp_path / 'run'}",
                           *FAST, "dist.tensor_parallel=2", "dist.zero_stage=3"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "NPROC_PER_NODE": "2"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("llmtrain-train: error: invalid dist config: "
                                                           "dist.tensor_parallel>1 combines with dist.zero_stage=0|1|2")
    assert "(this job: 2 rank(s), 2 per node x 1 node(s))" in proc.stderr
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_refusal_under_an_elastic_agent_is_not_retried(prepared_small, tmp_path):
    """torchrun --max-restarts 3 restarts failed ranks; a refusal would be the same at each restart, so the rank asks
    its agent to stop: one line, one attempt."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([str(BIN / "torchrun"), "--nnodes=1:1", "--nproc-per-node=1", "--max-restarts=3",
                           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "llmtrain.cli.train",
                           f"data.dir={prepared_small}", f"run.dir={tmp_path / 'run'}", *FAST,
                           "train.global_batch_size=7"], cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llmtrain-train: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "train.global_batch_size=7 is not a multiple of train.micro_batch_size=4" in errors[0]
    assert "attempts left" not in proc.stderr
