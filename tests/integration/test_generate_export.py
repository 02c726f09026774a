"""The trained-model commands on real checkpoints: llmtrain-generate, -export, -eval and -ngram, and the LSTM
baseline trained by the same trainer under DeepSpeed."""

from __future__ import annotations

import shutil

import pytest

from llmtrain.data.tokenizer import Tokenizer
from tests.conftest import run_cli
from tests.integration.conftest import STEPS, losses, val_losses

pytestmark = pytest.mark.slow  # every test here starts processes (the CLI, ranks) or reads a run that did

Z3 = ("z3-2ranks", 2, "precision=fp32", "dist.zero_stage=3")
Z2 = ("z2-2ranks", 2, "precision=fp32", "dist.zero_stage=2")
GREEDY = ("temperature=0", "max_new_tokens=24", "stop_at_eod=false")


def generate(run_dir, *args: str):
    proc = run_cli("llmtrain-generate", f"run.dir={run_dir}", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def eval_loss(*args: str) -> float:
    proc = run_cli("llmtrain-eval", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.strip().splitlines()[-1].split("|")[-3])


def test_zero3_checkpoint_of_two_ranks_loads_on_one_process(run):
    run_dir = run(*Z3)
    # the consolidated model scores the validation windows exactly as the 2-rank trainer did at its last step
    assert abs(eval_loss(f"run.dir={run_dir}", "max_windows=40") - val_losses(run_dir)[STEPS]) < 1e-4  # 4 decimals
    proc = generate(run_dir, "prompt=def f(x):", *GREEDY)
    assert proc.stdout.startswith("def f(x):") and len(proc.stdout) > len("def f(x):") + 5
    assert "INFO" not in proc.stdout and "checkpoint" not in proc.stdout  # logs go to stderr only


def test_seed_reproduces_and_export_generates_the_same(run, tmp_path):
    run_dir = run(*Z2)
    sample = ("prompt=import ", "seed=5", "max_new_tokens=30", "top_k=50", "top_p=0.9", "temperature=0.9")
    first = generate(run_dir, *sample).stdout
    assert generate(run_dir, *sample).stdout == first
    assert generate(run_dir, *sample[:1], "seed=6", *sample[2:]).stdout != first
    proc = run_cli("llmtrain-export", f"run.dir={run_dir}", f"out={tmp_path / 'st'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert generate(tmp_path / "st", *sample).stdout == first
    again = run_cli("llmtrain-export", f"run.dir={run_dir}", f"out={tmp_path / 'st'}")
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


def test_prompts_file_batched_equals_one_by_one(run, tmp_path):
    run_dir = run(*Z2)
    prompts = ["class A:", "for i in range(", "x"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    batched = generate(run_dir, f"prompts_file={tmp_path / 'prompts.txt'}", "batch_size=3", *GREEDY).stdout
    alone = [generate(run_dir, f"prompt={p}", *GREEDY).stdout[:-1] for p in prompts]  # the CLI ends with "\n"
    assert batched[:-1].split("\n\n" + "-" * 40 + "\n\n") == alone


def test_hf_export_loads_in_transformers(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir = run(*Z2)
    proc = run_cli("llmtrain-export", f"run.dir={run_dir}", "format=hf", f"out={tmp_path / 'hf'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert model.config.model_type == "gpt2"
    ours = Tokenizer.load(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "tokenizer.model")
    text = "def main():\n    print('hé 12')\n"
    assert tok(text)["input_ids"] == ours.encode(text)


@pytest.mark.parametrize(("args", "message"), [
    (["run.dir=/nonexistent/run"], "/nonexistent/run does not exist"),
    (["top_p=1.5"], r"top_p=1.5 must be in \(0, 1\]"),
    (["temperature=-1"], "temperature=-1.0 must be >= 0"),
    (["max_new_tokens=64"], "max_new_tokens=64 leaves no room for the prompt"),
])
def test_bad_generate_input_is_one_line(run, args, message):
    proc = run_cli("llmtrain-generate", f"run.dir={run(*Z2)}", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "llmtrain-generate: error" in line]
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), proc.stderr[-2000:]


def test_incomplete_checkpoint_and_foreign_tokenizer_are_refused(run, tmp_path):
    run_dir = run(*Z2)
    folder = tmp_path / "step_00000020"
    shutil.copytree(run_dir / "checkpoints" / "step_00000020", folder)
    (folder / "COMPLETE.json").unlink()
    proc = run_cli("llmtrain-generate", f"run.dir={folder}")
    assert proc.returncode == 2 and "incomplete checkpoint" in proc.stderr
    other = Tokenizer.train([f"def f{i}(x):\n    return x * {i}\n" for i in range(200)], vocab_size=300)
    other.save(tmp_path / "other.model")
    proc = run_cli("llmtrain-generate", f"run.dir={run_dir}", f"tokenizer={tmp_path / 'other.model'}")
    assert proc.returncode == 2 and f"tokenizer={tmp_path / 'other.model'} has another tokenizer than" in proc.stderr


LSTM = ("lstm-z2-2ranks", 2, "model=lstm", "model.n_embd=64", "model.block_size=32", "precision=fp32",
        "dist.zero_stage=2")


def test_lstm_trains_under_deepspeed_and_generates(run):
    run_dir = run(*LSTM)
    curve = losses(run_dir)
    assert curve[STEPS] < curve[1] - 0.5  # it learns under ZeRO-2 on 2 ranks
    assert abs(eval_loss(f"run.dir={run_dir}", "max_windows=40") - val_losses(run_dir)[STEPS]) < 1e-4  # 4 decimals
    proc = generate(run_dir, "prompt=def ", "max_new_tokens=100", "seed=1")  # longer than block_size: no limit
    assert proc.stdout.startswith("def ") and len(proc.stdout) > 20


def test_ngram_cli_at_equal_tokens(prepared_small):
    proc = run_cli("llmtrain-ngram", f"data.dir={prepared_small}", "order=3", "block_size=64", "train_tokens=20480")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = proc.stdout.strip().splitlines()[-1].split("|")
    assert row[2].strip() == "20,480"  # 320 windows of 64 targets
    full = run_cli("llmtrain-ngram", f"data.dir={prepared_small}", "order=3", "block_size=64")
    assert float(full.stdout.strip().splitlines()[-1].split("|")[-2]) < float(row[-2])  # more data, lower ppl


@pytest.mark.parametrize(("command", "fragment"), [
    ("llmtrain-generate", "  top_p = 1.0\n      Nucleus sampling"),
    ("llmtrain-export", "  format = 'safetensors'\n      safetensors (llmtrain's consolidated folder) | hf"),
    ("llmtrain-eval", "  text_file = ''\n      A UTF-8 text file to score instead"),
    ("llmtrain-ngram", "  order = 3\n      n of the n-gram model."),
])
def test_help_of_each_command(command, fragment):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0 and fragment in proc.stdout, proc.stdout
    assert ("Config groups" in proc.stdout) == (command == "llmtrain-ngram")  # only groups its root uses


def test_zero0_checkpoints_load_fp32_and_bf16_masters(run):
    import torch

    from llmtrain.run.trained import load_trained

    fp32_dir = run("z0-1rank", 1, "precision=fp32", "dist.zero_stage=0")
    assert abs(eval_loss(f"run.dir={fp32_dir}", "max_windows=40") - val_losses(fp32_dir)[STEPS]) < 1e-4
    bf16_dir = run("bf16-z0-1rank", 1, "precision=bf16", "dist.zero_stage=0")
    trained = load_trained(bf16_dir)
    module = torch.load(bf16_dir / "checkpoints" / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    for name, weight in module.items():  # the fp32 masters, mapped to the right names, round to the bf16 weights
        master = trained.state_dict[name]
        assert master.dtype == torch.float32 and torch.equal(master.bfloat16(), weight), name
    assert any(not torch.equal(trained.state_dict[n], w.float()) for n, w in module.items())  # more than bf16


def test_export_to_an_impossible_path_is_one_line(run, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    proc = run_cli("llmtrain-export", f"run.dir={run('z0-1rank', 1, 'precision=fp32', 'dist.zero_stage=0')}",
                   f"out={tmp_path}/file/sub")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"llmtrain-export: error: cannot write out={tmp_path}/file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
