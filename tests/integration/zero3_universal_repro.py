"""Minimal reproduction (DeepSpeed only, 1 CPU process, a few seconds): DeepSpeed ZeRO-3's universal checkpoint load
(DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3) corrupts the optimizer:

 1. every sub-group's state['step'] is the SAME tensor object (optim_sd['state'][0]['step']); torch's Adam/AdamW
    increment it in place once per sub-group, so one optimizer step counts as many steps as there are sub-groups
    (wrong bias corrections from then on);
 2. every param group gets the hyperparameters of the checkpoint's param_groups[0] (weight_decay of a no-decay
    group becomes the decay group's).

Run: DS_ACCELERATOR=cpu python tests/integration/zero3_universal_repro.py   (exit 0: fixed upstream; 1: the bug)
llmtrain mends both after the load: llmtrain/workarounds.py, ZERO3_UNIVERSAL_LOAD.
"""
import os
import sys
import tempfile
from argparse import Namespace

os.environ.setdefault("DS_ACCELERATOR", "cpu")
for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "LOCAL_RANK": "0",
             "WORLD_SIZE": "1"}.items():
    os.environ.setdefault(k, v)
import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")


def engine(universal=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, foreach=True)
    cfg = {"train_batch_size": 4, "zero_optimization": {"stage": 3, "sub_group_size": 600,  # -> several sub-groups
                                                        "stage3_param_persistence_threshold": 0},
           "zero_allow_untested_optimizer": True, "checkpoint": {"load_universal": universal}}
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return eng


def train(eng, steps, seed):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(4, 32, generator=g), torch.randn(4, 8, generator=g)
        loss = torch.nn.functional.mse_loss(eng(x), y)
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    return losses


def report(eng, what):
    opt = eng.optimizer
    steps = [opt.optimizer.state[f]["step"] for f in opt.fp32_partitioned_groups_flat]
    print(f"{what}: {len(steps)} sub-groups, step values {[float(s) for s in steps]}, "
          f"distinct step tensors {len({id(s) for s in steps})}; weight_decay per group "
          f"{[g['weight_decay'] for g in opt.optimizer.param_groups]}")


with tempfile.TemporaryDirectory() as tmp:
    a = engine()
    train(a, 3, seed=1)
    a.save_checkpoint(tmp, tag="step3")
    ref = train(a, 3, seed=2)               # uninterrupted steps 4-6
    report(a, "uninterrupted after step 6 ")

    b = engine()                             # rigid (same-layout) load
    b.load_checkpoint(tmp, tag="step3")
    rigid = train(b, 3, seed=2)

    ds_to_universal(Namespace(input_folder=f"{tmp}/step3", output_folder=f"{tmp}/universal", num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    c = engine(universal=True)               # universal load (any world size; here the same one)
    c.load_checkpoint(tmp, tag="universal")
    report(c, "universal load, before step 4")
    univ = train(c, 3, seed=2)
    report(c, "universal load, after step 6 ")

    print("losses steps 4-6  uninterrupted:", ref)
    print("                  rigid load:   ", rigid)
    print("                  universal:    ", univ)
    ok = rigid == ref and univ == ref
    print("OK" if ok else "BUG: the universal load does not resume the run")
    sys.exit(0 if ok else 1)
