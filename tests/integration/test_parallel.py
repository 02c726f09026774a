"""Tensor-, sequence- and pipeline-parallel layouts train exactly the 1-process model: 20 fp32 steps of `tiny` give
its losses and gradient norms within 1e-5 relative (AdamW, and SGD, which unlike Adam would show gradients off by a
factor); a run stopped and resumed in its layout gives its own losses bitwise; a checkpoint resumes in another layout
through DeepSpeed's universal format; each layout's export equals the 1-process export; the norm llmtrain clips with
is a float64 norm of the whole gradient."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BIN, REPO, run_cli
from tests.integration.conftest import launch, losses, val_losses

pytestmark = pytest.mark.slow  # every test here trains on 2 or 4 ranks

EXACT = ["precision=fp32", "train.checkpoint_every=10"]
# name -> (ranks, overrides): each axis at 2 ranks and beside data parallel at 4 (two ranks a core is fine here),
# across ZeRO stages, with activation checkpointing under sequence parallel.
LAYOUTS = {
    "tp2": (2, ["dist.tensor_parallel=2", "dist.zero_stage=1"]),
    "sp2": (2, ["dist.sequence_parallel=2", "dist.zero_stage=3", "dist.activation_checkpointing=true"]),
    "tp2_dp2": (4, ["dist.tensor_parallel=2", "dist.zero_stage=2"]),
    "sp2_dp2": (4, ["dist.sequence_parallel=2", "dist.zero_stage=1"]),
    # ZeRO-0 in fp32, where the trainer clips and reports the norm itself, with SGD
    "tp2_sgd": (2, ["dist.tensor_parallel=2", "dist.zero_stage=0", "optim.name=sgd"]),
    "sp2_sgd": (2, ["dist.sequence_parallel=2", "dist.zero_stage=0", "optim.name=sgd"]),
    # pipeline stages (DeepSpeed's engine, 1F1B): ZeRO-1 on 2 ranks; ZeRO-0, where llmtrain clips inside the
    # optimizer's step, beside data parallel with activation checkpointing; DualPipeV (a block per piece: 4 layers,
    # and at least 2 x stages micro-batches per step)
    "pp2": (2, ["dist.pipeline_parallel=2", "dist.zero_stage=1"]),
    "pp2_dp2": (4, ["dist.pipeline_parallel=2", "dist.zero_stage=0", "dist.activation_checkpointing=true"]),
    "dualpipev": (2, ["dist.pipeline_parallel=2", "dist.pipeline_schedule=dualpipev", "dist.zero_stage=0"]),
    # expert parallel (DeepSpeed's MoE layer) at each ZeRO stage: 2 experts a rank on 2 ranks; on 4 data-parallel
    # ranks, two expert-parallel groups of 2
    "ep2": (2, ["dist.expert_parallel=2", "dist.zero_stage=0"]),
    "ep2_zero1": (2, ["dist.expert_parallel=2", "dist.zero_stage=1"]),
    "ep2_dp4": (4, ["dist.expert_parallel=2", "dist.zero_stage=2"]),
    # the experts whole on every rank, partitioned by ZeRO-3 like any weight (the router's backward gathers its own)
    "moe_zero3": (2, ["dist.zero_stage=3"]),
}
MOE = ["model.norm=rmsnorm", "model.pos=rope", "model.mlp=swiglu", "model.n_experts=4", "model.experts_per_token=2",
       "train.router_z_coef=0.001"]
"""The Llama-style `tiny` as a mixture of 4 experts, 2 per token, dropless."""
MODEL = {"dualpipev": ("4_blocks", ["model.n_layer=4", "train.micro_batch_size=2"]),
         "ep2": ("moe", MOE), "ep2_zero1": ("moe", MOE), "ep2_dp4": ("moe_micro2", [*MOE, "train.micro_batch_size=2"]),
         "moe_zero3": ("moe", MOE)}
"""Settings of a layout that its 1-process run shares (the micro-batches the same: the router's losses are per
micro-batch), with the reference's name."""


@pytest.fixture(scope="module")
def trained(run):
    """Each layout's run, and the 1-process run of its optimizer."""

    def _trained(name: str) -> tuple[Path, Path]:
        ranks, overrides = LAYOUTS[name]
        sgd = "optim.name=sgd" in overrides
        reference, shared = MODEL.get(name, ("", []))
        return (run(name, ranks, *EXACT, *shared, *overrides),
                run(f"one_{'sgd' if sgd else 'adamw'}{f'_{reference}' if shared else ''}", 1, *EXACT, *shared,
                    *(["optim.name=sgd"] if sgd else [])))

    return _trained


def relative_gap(ours: dict[int, float], theirs: dict[int, float]) -> float:
    assert ours.keys() == theirs.keys() and ours
    return max(abs(ours[step] - theirs[step]) / abs(theirs[step]) for step in theirs)


def grad_norms(run_dir: Path) -> dict[int, float]:
    return logged(run_dir, "grad_norm")


def logged(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_trains_the_one_process_model(trained, name):
    layout, one = trained(name)
    assert relative_gap(losses(layout), losses(one)) < 1e-5
    assert relative_gap(grad_norms(layout), grad_norms(one)) < 1e-5
    assert relative_gap(val_losses(layout), val_losses(one)) < 1e-5
    assert len(losses(layout)) == 20
    if MODEL.get(name, ("", []))[1][:len(MOE)] == MOE:  # the router's losses and the experts' loads too
        for key in ("moe/aux_loss", "moe/z_loss", "moe/1/load/3"):
            assert relative_gap(logged(layout, key), logged(one, key)) < 1e-5


@pytest.mark.parametrize("name", ["tp2", "sp2", "dualpipev", "ep2"])
def test_stop_and_resume_in_the_layout_is_bitwise(trained, prepared_small, tmp_path, name):
    """The layout's run resumed from its step-10 checkpoint (a copy, the step-20 one removed) gives steps 11-20
    bitwise. (Stopping itself: tests/integration/test_train.py's train.stop_at_step test.)"""
    layout, _ = trained(name)
    ranks, overrides = LAYOUTS[name]
    run_dir = tmp_path / "resumed"
    shutil.copytree(layout, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000020")
    _, shared = MODEL.get(name, ("", []))
    launch(run_dir, prepared_small, ranks, *EXACT, *shared, *overrides)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = {row["step"]: row["loss"] for row in [r for r in rows if "loss" in r][20:]}  # after the copied 20
    assert resumed == {step: loss for step, loss in losses(layout).items() if step > 10}
    assert sorted(resumed) == list(range(11, 21))


def test_pipeline_dropout_is_seeded_per_micro_batch_and_resumes_bitwise(run, prepared_small, tmp_path):
    """Dropout masks drawn inside DeepSpeed's pipeline schedule depend only on (seed, step, micro-batch, rank): a
    resume without RNG state repeats them."""
    ranks, overrides = LAYOUTS["pp2"]
    dropout = [*EXACT, *overrides, "model.dropout=0.1"]
    whole = losses(run("pp2_dropout", ranks, *dropout))
    assert relative_gap(whole, losses(run("pp2", ranks, *EXACT, *overrides))) > 1e-4  # dropout is on
    run_dir = tmp_path / "resumed"
    launch(run_dir, prepared_small, ranks, *dropout, "train.stop_at_step=10")
    launch(run_dir, prepared_small, ranks, *dropout)
    assert losses(run_dir) == whole


@pytest.mark.parametrize(("name", "ranks", "overrides"), [
    ("tp2", 1, ["dist.zero_stage=1"]),  # tensor parallel 2 on 2 ranks -> 1 rank
    # sequence parallel 2 x data 2 on 4 ranks -> data parallel on 2 (ZeRO-3 through the universal format:
    # tests/integration/test_train.py)
    ("sp2_dp2", 2, ["dist.zero_stage=1"]),
    # pipeline 2 -> 1 rank, and -> 2 data-parallel ranks: the universal form under the whole model's names
    ("pp2", 1, ["dist.zero_stage=1"]),
    ("pp2", 2, ["dist.zero_stage=1"]),
])
def test_checkpoint_resumes_in_another_layout(trained, prepared_small, tmp_path, name, ranks, overrides):
    layout, one = trained(name)
    run_dir = tmp_path / "moved"
    shutil.copytree(layout, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000020")  # the newest complete one is now step 10's
    proc = launch(run_dir, prepared_small, ranks, *EXACT, *overrides)
    assert "through DeepSpeed's universal format" in proc.stderr
    continued = {step: loss for step, loss in losses(run_dir).items() if step > 10}
    assert len(continued) == 10
    assert relative_gap(continued, {step: losses(one)[step] for step in continued}) < 1e-5


def exported(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    proc = run_cli("llmtrain-export", f"run.dir={run_dir}", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(next(out.glob("*.safetensors")))


def test_an_expert_parallel_checkpoint_resumes_only_in_its_layout(trained, prepared_small, tmp_path):
    """EP = 2 -> 1 rank is refused in one line, before anything is written; the checkpoints stay as they were."""
    layout, _ = trained("ep2")
    run_dir = tmp_path / "moved"
    shutil.copytree(layout, run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = launch(run_dir, prepared_small, 1, *EXACT, *MOE, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "dist.expert_parallel=2 on 2 rank(s)" in last and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("name", ["tp2", "sp2", "pp2", "dualpipev", "ep2"])
def test_export_of_the_layout_equals_the_one_process_export(trained, tmp_path, name):
    layout, one = trained(name)
    ours, theirs = exported(layout, tmp_path / "layout"), exported(one, tmp_path / "one")
    assert ours.keys() == theirs.keys()
    assert all(ours[key].shape == theirs[key].shape for key in theirs)  # whole tensors, slices joined
    # Relative to the whole model's norm: single small tensors differ by the float rounding of 20 steps.
    difference = sum(((ours[k] - theirs[k]) ** 2).sum() for k in theirs) ** 0.5
    limit = 1e-5 if name == "dualpipev" else 1e-6  # 4 layers: measured 3.0e-6 (the other layouts have 2)
    assert difference / sum((t**2).sum() for t in theirs.values()) ** 0.5 < limit
    proc = run_cli("llmtrain-generate", f"run.dir={tmp_path / 'layout'}", "prompt=def f(x):", "temperature=0",
                   "max_new_tokens=8", "stop_at_eod=false")
    assert proc.returncode == 0 and proc.stdout.startswith("def f(x):"), proc.stderr[-3000:]
    if name == "ep2":  # llmtrain-eval reads the expert-parallel checkpoint: its validation loss, to 4 decimals
        proc = run_cli("llmtrain-eval", f"run.dir={layout}", "max_windows=40")
        assert proc.returncode == 0, proc.stderr[-3000:]
        loss = float(proc.stdout.strip().splitlines()[-1].split("|")[-3])
        assert abs(loss - val_losses(layout)[20]) < 1e-4


NORM_PROBE = Path(__file__).with_name("norm_probe.py")


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 1, 1), (1, 2, 1)], ids=["one", "pp2", "tp2"])
def test_the_logged_norm_is_a_float64_norm_of_the_whole_gradient(prepared_small, tmp_path, layout):
    """Where llmtrain clips (ZeRO-0 in fp32: one process, a pipeline inside its optimizer step, tensor parallel),
    the norm it clips with and logs equals a float64 recomputation of the whole gradient within 1e-6."""
    ranks = layout[0] * layout[1] * layout[2]
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", str(NORM_PROBE),
                           str(prepared_small), str(tmp_path / "run"), *map(str, layout)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(steps) == 6
    assert max(abs(s["ours"] - s["float64"]) / s["float64"] for s in steps) <= 1e-6, steps


@pytest.mark.xfail(strict=True, reason="DeepSpeed 0.19: AutoTP cannot split a pipeline module's stages (its groups "
                   "span the stages; initialize's broadcast fails). Passing means an upgrade fixed it: lift the "
                   "refusal in llmtrain/config/layout.py and add PP x TP to LAYOUTS.")
def test_deepspeed_runs_pipeline_with_tensor_parallel():
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=4",
                           str(Path(__file__).with_name("pipeline_tp_repro.py"))],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
