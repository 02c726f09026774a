"""model.init_from through the real CLI: models that transformers built continue training under ZeRO-0 (1 rank)
and ZeRO-3 (2 ranks) alike, starting from exactly their weights; resume, generate and export work as for a model
trained from scratch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import BIN, REPO, run_cli
from tests.hf_models import save_random_hf
from tests.integration.conftest import launch, losses

pytestmark = pytest.mark.slow  # every test here starts processes (the CLI, ranks) or reads a run that did

transformers = pytest.importorskip("transformers")
STEPS = 5
INIT = [f"train.max_steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=4", "train.log_every=1",
        "train.eval_every=0", "train.eval_windows=20", "train.checkpoint_every=0", "optim.warmup_steps=1",
        "optim.lr=1e-3", "model.block_size=64", "precision=fp32"]
_RUNS: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def hf_folders(prepared_small, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    for kind in ("llama", "gpt2"):
        save_random_hf(kind, root / kind, prepared_small / "tokenizer.model", 1024)
    return {kind: root / kind for kind in ("llama", "gpt2")}


@pytest.fixture(scope="session")
def init_run(hf_folders, prepared_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("init-runs")

    def _run(kind: str, ranks: int, *overrides: str) -> Path:
        key = (kind, ranks, overrides)
        if key not in _RUNS:
            run_dir = root / f"{kind}-{ranks}-{len(_RUNS)}"
            launch(run_dir, prepared_small, ranks, f"model.init_from={hf_folders[kind]}", *overrides, common=INIT)
            _RUNS[key] = run_dir
        return _RUNS[key]

    return _run


def rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (a, b)
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


def test_llama_continues_alike_under_zero0_and_zero3(init_run):
    one = losses(init_run("llama", 1, "dist.zero_stage=0"))
    two = losses(init_run("llama", 2, "dist.zero_stage=3"))
    assert rel_diff(two, one) <= 1e-4, (two, one)
    assert one[STEPS] < one[1]  # it learns


@pytest.mark.parametrize("kind", ["llama", "gpt2", "export"])
def test_zero3_starts_from_exactly_the_imported_weights(kind, hf_folders, prepared_small, tmp_path):
    """Each rank reads only its partitions' slices of the safetensors files (Llama's fused q/k/v and gate/up, GPT-2's
    transposed Conv1D and learned positions cut to the block, an llmtrain export in bf16 with its head tied), and
    the weights equal a whole load's bitwise."""
    from llmtrain.run.trained import load_trained, save_consolidated

    folder = hf_folders[kind] if kind != "export" else save_consolidated(
        load_trained(hf_folders["gpt2"]), tmp_path / "export", dtype="bf16")
    script, out = Path(__file__).with_name("initial_weights_run.py"), tmp_path / "init.pt"
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script),
                           str(prepared_small), str(tmp_path / "run"), "3", str(out), str(folder)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out, weights_only=False)
    imported = load_trained(folder, block_size=64).state_dict
    assert saved["model"].block_size == 64 and saved["model"].kv_heads == (2 if kind == "llama" else 4)
    assert saved["weights"].keys() == imported.keys()
    for name, weight in saved["weights"].items():
        assert torch.equal(weight, imported[name].float()), name  # bitwise, gathered from the 2 ranks' partitions
    total = sum(w.numel() for w in imported.values())
    split_rows = sum(2 * w[0].numel() for w in imported.values())  # a partition may start and end inside a row
    assert sum(saved["read"]) >= total, (saved["read"], total)
    assert all(0 < read <= held + split_rows for read, held in zip(saved["read"], saved["held"], strict=True)), (
        saved["read"], saved["held"])  # its own partitions, never the whole model


def test_zero3_run_resumes_and_exports_back_to_transformers(init_run, hf_folders, prepared_small, tmp_path):
    from llmtrain.run.trained import load_trained

    reference = losses(init_run("llama", 2, "dist.zero_stage=3"))
    run_dir = tmp_path / "resumed"
    first = launch(run_dir, prepared_small, 2, f"model.init_from={hf_folders['llama']}", "dist.zero_stage=3",
                   "train.stop_at_step=3", common=INIT)
    assert "stopped at step 3" in first.stdout
    launch(run_dir, prepared_small, 2, f"model.init_from={hf_folders['llama']}", "dist.zero_stage=3", common=INIT)
    assert rel_diff(losses(run_dir), reference) <= 1e-4
    proc = run_cli("llmtrain-export", f"run.dir={run_dir}", "format=hf", f"out={tmp_path / 'hf'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_trained(run_dir).build()
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (theirs(ids).logits - ours(ids)[0]).abs().max().item()
    print(f"\ntrained llama (ZeRO-3, 2 ranks) -> transformers: max |logit diff| = {gap:.3g}")
    assert gap <= 1e-4
    proc = run_cli("llmtrain-generate", f"run.dir={run_dir}", "prompt=def f(x):", "temperature=0",
                   "max_new_tokens=8", "stop_at_eod=false")
    assert proc.returncode == 0 and proc.stdout.startswith("def f(x):"), proc.stderr[-2000:]


def test_gpt2_continues_in_fp32_and_bf16(init_run):
    fp32 = losses(init_run("gpt2", 1, "dist.zero_stage=0"))
    bf16 = losses(init_run("gpt2", 2, "dist.zero_stage=2", "precision=bf16"))
    assert fp32[STEPS] < fp32[1]
    assert abs(bf16[1] - fp32[1]) / fp32[1] < 0.02  # the same start, within bf16's rounding


def test_another_tokenizer_or_an_unsupported_field_is_one_line(hf_folders, prepared_small, tmp_path):
    from llmtrain.data.tokenizer import Tokenizer

    save_random_hf("llama", tmp_path / "other", None, 1024)
    Tokenizer.train([f"def f{i}(x):\n    return x * {i}\n" for i in range(200)], vocab_size=300).save(
        tmp_path / "other" / "tokenizer.model")
    proc = launch(tmp_path / "run", prepared_small, 1, f"model.init_from={tmp_path / 'other'}", common=INIT,
                  check=False)
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode == 2 and "has another tokenizer than model.init_from=" in last, last
    config = (hf_folders["gpt2"] / "config.json").read_text()
    (tmp_path / "relu").mkdir()
    (tmp_path / "relu" / "config.json").write_text(config.replace('"gelu_new"', '"relu"'))
    proc = launch(tmp_path / "run2", prepared_small, 1, f"model.init_from={tmp_path / 'relu'}", common=INIT,
                  check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "activation_function=relu is not supported" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_gpt2_with_its_tokenizer_json_prepares_trains_generates_and_exports(tmp_path):
    """GPT-2's byte-level BPE through the second tokenizer backend, from prepare to a transformers export."""
    from llmtrain.data.tokenizer import Tokenizer
    from llmtrain.run.trained import load_trained
    from tests.hf_models import save_byte_level_bpe

    folder = tmp_path / "gpt2-bpe"
    tokenizer_json = save_byte_level_bpe(folder)
    save_random_hf("gpt2", folder, None, 1024)  # a vocabulary padded beyond the tokenizer's (<= 1000)
    proc = run_cli("llmtrain-prepare", "data=stdlib", f"data.dir={tmp_path / 'data'}", "data.max_documents=60",
                   f"data.tokenizer_path={tokenizer_json}", "data.num_proc=1", "data.val_fraction=0.1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "run"
    launch(run_dir, tmp_path / "data", 1, f"model.init_from={folder}", "dist.zero_stage=0", common=INIT)
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1)) and curve[STEPS] < curve[1]
    checkpoint = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert (checkpoint / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()  # it stands on its own
    proc = run_cli("llmtrain-generate", f"run.dir={run_dir}", "prompt=import os", "temperature=0",
                   "max_new_tokens=8", "stop_at_eod=false")
    assert proc.returncode == 0 and proc.stdout.startswith("import os"), proc.stderr[-2000:]
    proc = run_cli("llmtrain-export", f"run.dir={run_dir}", "format=hf", f"out={tmp_path / 'hf'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours_tok = Tokenizer.load(tokenizer_json)
    text = "def main():\n    print('hé 12 <|endoftext|>')\n"
    assert hf_tok(text)["input_ids"] == ours_tok.encode(text) and hf_tok.eos_token_id == ours_tok.eod_id
    ids = torch.tensor([ours_tok.encode(text)[:64]])
    with torch.no_grad():
        gap = (theirs(ids).logits - load_trained(run_dir).build()(ids)[0]).abs().max().item()
    print(f"\ntrained gpt2 (tokenizer.json) -> transformers: max |logit diff| = {gap:.3g}")
    assert gap <= 1e-4
