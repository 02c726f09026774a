"""Bad values given to each command: one line naming what to change, exit 2, no traceback, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, run_cli
from tests.integration.conftest import COMMON

pytestmark = pytest.mark.slow  # every test here starts processes (the CLI, ranks) or reads a run that did


def refused(proc: subprocess.CompletedProcess, command: str, fragment: str) -> str:
    """The one error line of a refused command (exit 2, no traceback), checked to contain ``fragment``."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{command}: error: ") and fragment in last, last
    return last


def test_a_typo_in_data_dir_is_refused_not_prepared_from_the_default_corpus(prepared_small, tmp_path):
    typo = tmp_path / "stdlbi"
    proc = run_cli("llmtrain-train", f"data.dir={typo}", f"run.dir={tmp_path}/run", *COMMON)
    refused(proc, "llmtrain-train", f"data.dir={typo} holds no prepared dataset; prepare it with llmtrain-prepare")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither a data folder nor a run folder
    proc = run_cli("llmtrain-compare", f"data.dir={typo}", *COMMON, f"compare.dir={tmp_path}/cmp")
    refused(proc, "llmtrain-compare", f"data.dir={typo} holds no prepared dataset")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_naming_the_source_prepares_a_missing_data_dir_first(tmp_path):
    data_dir = tmp_path / "data"
    proc = run_cli("llmtrain-train", "data=stdlib", f"data.dir={data_dir}", "data.max_documents=40",
                   "data.vocab_size=512", "data.num_proc=1", f"run.dir={tmp_path}/run", *COMMON, "train.max_steps=2",
                   "train.eval_every=2", "train.eval_windows=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "holds no prepared dataset: preparing it first (data=stdlib)" in proc.stderr
    assert (data_dir / "meta.json").is_file()


def test_a_run_dir_that_is_a_file_is_one_line(prepared_small, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    proc = run_cli("llmtrain-train", f"data.dir={prepared_small}", f"run.dir={tmp_path}/file", *COMMON)
    refused(proc, "llmtrain-train", f"cannot create run.dir={tmp_path}/file: {tmp_path}/file is a file, not a folder")
    proc = run_cli("llmtrain-prepare", "data=stdlib", f"data.dir={tmp_path}/file/data")
    refused(proc, "llmtrain-prepare", f"{tmp_path}/file is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def default_extensions_dir() -> str:
    """torch's own choice when TORCH_EXTENSIONS_DIR is unset (torch.utils.cpp_extension), where set-up built the ops."""
    import torch

    build = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return str(Path.home() / ".cache" / "torch_extensions" / f"{python}_{build}")


def test_wandb_online_without_a_login_is_one_line(prepared_small, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_DIR=str(tmp_path / "wandb"))  # no ~/.netrc holding a key
    # ... but the compiled extensions of the real home's cache (DeepSpeed's comm op would be built again: a minute),
    # the folder torch picks by default, under the interpreter's and build's name
    env.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    proc = run_cli("llmtrain-train", f"data.dir={prepared_small}", f"run.dir={tmp_path}/run", *COMMON,
                   "wandb.mode=online", env=env)
    refused(proc, "llmtrain-train", "wandb.mode=online could not start the W&B run (")
    assert not (tmp_path / "run").exists()


def test_export_to_a_read_only_file_system_is_one_line(run, tmp_path):
    trained = run("z0-1rank", 1, "precision=fp32", "dist.zero_stage=0")
    disk = tmp_path / "read-only"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("mounting a read-only tmpfs needs root")
    try:
        proc = run_cli("llmtrain-export", f"run.dir={trained}", f"out={disk}/model")
        refused(proc, "llmtrain-export", f"cannot write out={disk}/model: read-only file system")
        assert list(Path(disk).iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# The config values that once ended in a traceback, or trained though they cannot be meant: each command now
# refuses them in one line that lists every problem of the section.
CONFIG_CASES = [
    (["optim.lr=nan", "optim.beta1=1.5", "optim.beta2=-1", "optim.eps=-1", "optim.weight_decay=-1"],
     ["optim.lr=nan must be > 0 and finite", "optim.beta1=1.5 must be in [0, 1)", "optim.beta2=-1.0 must be in [0, 1)",
      "optim.eps=-1.0 must be > 0 and finite", "optim.weight_decay=-1.0 must be >= 0 and finite"]),
    (["optim.lr=inf"], ["optim.lr=inf must be > 0 and finite"]),
    (["model.n_kv_head=-2", "model.mlp_hidden=-5", "model.init_std=-1", "model.norm_eps=-1", "model.rope_theta=0"],
     ["model.n_kv_head=-2 must be >= 0", "model.mlp_hidden=-5 must be >= 0", "model.init_std=-1.0 must be > 0",
      "model.norm_eps=-1.0 must be > 0", "model.rope_theta=0.0 must be > 0"]),
    (["dist.timeout_s=0"], ["dist.timeout_s=0 must be >= 1"]),
    (["run.dir="], ["run.dir is empty: give the run folder"]),
    (["train.subset_tokens=10"], ["train.subset_tokens=10 is less than one window of model.block_size+1"]),
    (["run.dir=runs/é"], ["""quote a value with non-ASCII or special characters: 'run.dir="runs/é"'"""]),
]


@pytest.mark.parametrize(("overrides", "fragments"), CONFIG_CASES, ids=lambda v: " ".join(v)[:40])
def test_a_value_out_of_its_range_is_one_line(tmp_path, overrides, fragments):
    run_dir = f"run.dir={tmp_path}/run"
    proc = run_cli("llmtrain-train", f"data.dir={tmp_path}/data", *COMMON, run_dir, *overrides)
    line = refused(proc, "llmtrain-train", fragments[0])
    assert all(fragment in line for fragment in fragments), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before any folder was made


def test_a_mix_needs_no_data_dir(tmp_path):
    proc = run_cli("llmtrain-train", f"data.mix=[{{dir: {tmp_path}/a}}]", f"run.dir={tmp_path}/run", *COMMON)
    line = refused(proc, "llmtrain-train", f"data.mix[0]: data.dir={tmp_path}/a is not a prepared dataset")
    assert "missing required value" not in line  # it reached the mix's own folder: no "add data.dir=..."


def test_too_few_processes_for_the_async_mode_is_said_once(prepared_small, tmp_path):
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "llmtrain.cli.train",
                           f"data.dir={prepared_small}", f"run.dir={tmp_path}/run", *COMMON, "mode=async_ps",
                           "ps.num_servers=2"], capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [line for line in proc.stderr.splitlines() if "llmtrain-train: error:" in line]
    assert lines == ["llmtrain-train: error: mode=async_ps with ps.num_servers=2 needs at least 3 processes; the "
                     "launcher started 2"], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr and "rank      : 0" in proc.stderr.split("Root Cause")[1]
