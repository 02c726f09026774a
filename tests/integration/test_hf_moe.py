"""A transformers mixture of experts through the real CLI: model.init_from=<a Mixtral folder> trains from exactly its
weights, read from its stored experts, and the run exports back to the same Mixtral and generates."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli
from tests.hf_models import save_random_hf
from tests.integration.conftest import launch, losses

pytestmark = pytest.mark.slow  # it starts processes (the trainer, the export and generate commands)

transformers = pytest.importorskip("transformers")
STEPS = 2
VOCAB = 1024  # prepared_small's tokenizer
# a learning rate far below the spacing of fp32 numbers around these weights (~1e-9): the steps run, every tensor
# goes through the optimizer, and none moves, so the checkpoint must hold exactly the imported weights
INIT = [f"train.max_steps={STEPS}", "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=1",
        "train.eval_every=0", "train.eval_windows=8", "train.checkpoint_every=0", "optim.warmup_steps=0",
        "optim.lr=1e-30", "model.block_size=32", "precision=fp32"]


def test_mixtral_trains_from_exactly_its_weights_and_exports_back(prepared_small, tmp_path):
    from safetensors.torch import load_file

    from llmtrain.run.trained import load_trained

    folder = tmp_path / "mixtral"
    theirs = save_random_hf("mixtral", folder, prepared_small / "tokenizer.model", VOCAB)
    run_dir = tmp_path / "run"
    launch(run_dir, prepared_small, 1, f"model.init_from={folder}", "dist.zero_stage=0", common=INIT)
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    proc = run_cli("llmtrain-export", f"run.dir={run_dir}", "format=hf", f"out={tmp_path / 'hf'}")
    assert proc.returncode == 0 and "mixtral" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    original, back = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert back.keys() == original.keys()
    for name, tensor in original.items():  # every expert of every block, where it was
        assert torch.equal(back[name], tensor), name
    trained = load_trained(run_dir)
    assert trained.model_cfg.n_experts == 4 and trained.model_cfg.block_size == 32
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (theirs(ids).logits - trained.build()(ids)[0]).abs().max().item()
    print(f"\nmixtral through model.init_from, training and the export: max |logit diff| = {gap:.3g}")
    assert gap <= 1e-4
    proc = run_cli("llmtrain-generate", f"run.dir={run_dir}", "prompt=def f(x):", "temperature=0",
                   "max_new_tokens=8", "stop_at_eod=false")
    assert proc.returncode == 0 and proc.stdout.startswith("def f(x):"), proc.stderr[-2000:]
