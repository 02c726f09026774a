"""The gloo path of DeepSpeed's post-step gather (llmtrain/workarounds.py, ``gather_by_broadcast``): two
real gloo ranks, against DeepSpeed's own all-gather, bitwise."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmtrain.workarounds import gather_by_broadcast

pytestmark = pytest.mark.slow
SIZES = (10_007 * 2, 6)  # two groups, as a GPT's decay / no-decay groups: a large one and a tiny one


def groups(rank: int, world: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Flat buffers whose own partition holds this rank's (random) values and the rest garbage, as after the
    optimizer step; the partitions are views of the flat buffers, as in ZeRO-1/2."""
    flats, parts = [], []
    for size in SIZES:
        flat = torch.full((size,), float("nan"))
        views = list(flat.split(size // world))
        views[rank].copy_(torch.randn(size // world, generator=torch.Generator().manual_seed(100 * rank + size)))
        flats.append(flat)
        parts.append(views)
    return flats, parts


def rank_main(rank: int, world: int, init: str, out: str) -> None:
    import deepspeed
    from deepspeed.runtime.utils import all_gather_into_tensor_dp_groups

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    deepspeed.init_distributed("gloo")  # DeepSpeed's comm layer, on the group above
    pg = [dist.group.WORLD] * len(SIZES)
    expected, expected_parts = groups(rank, world)
    all_gather_into_tensor_dp_groups(expected, expected_parts, pg)

    def refuse(*args, **kwargs):
        raise AssertionError("the gloo path must not call the original")

    got, got_parts = groups(rank, world)
    gather_by_broadcast(refuse)(got, got_parts, pg, 1, 1 << 20)
    torch.save({"expected": expected, "got": got}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_broadcast_gather_equals_deepspeeds_all_gather_bitwise(tmp_path):
    world = 2
    mp.spawn(rank_main, args=(world, f"file://{tmp_path / 'init'}", str(tmp_path / "out")), nprocs=world)
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(world)]
    for result in results:
        for expected, got in zip(result["expected"], result["got"], strict=True):
            assert not got.isnan().any()
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    # every rank ends with the same buffers: the gathered whole
    assert all(torch.equal(a, b) for a, b in zip(results[0]["got"], results[1]["got"], strict=True))
