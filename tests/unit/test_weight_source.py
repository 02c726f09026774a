"""Weights read in slices (llmtrain/weights.py, ``open_trained``): every rank's ZeRO-3 partition read from rows of
the files equals the same elements of the whole tensor, and the tensors equal those of a whole load bitwise, for
transformers folders (fused Llama weights, GPT-2's transposed Conv1D, sharded, fp16-stored) and llmtrain exports."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from llmtrain.distributed.deepspeed import copy_weights, partition_range
from llmtrain.errors import UserError
from llmtrain.model import build_model
from llmtrain.run.trained import load_trained, open_trained, save_consolidated
from llmtrain.weights import SafetensorsWeights, TensorWeights, WeightSource
from tests.hf_models import save_random_hf

VOCAB = 1024  # prepared_small's tokenizer


def partitions(source: WeightSource, name: str, world: int) -> torch.Tensor:
    """Every rank's ZeRO-3 partition of ``name`` read with ``flat``, side by side; padding is NaN."""
    numel = math.prod(source.shape(name))
    size = -(-numel // world)
    out = torch.full((world, size), float("nan"))
    for rank in range(world):
        start, count = partition_range(numel, size, rank)
        out[rank, :count] = source.flat(name, start, count)
    return out.reshape(-1)


def assert_partitions_rebuild(source: WeightSource, whole: dict[str, torch.Tensor], worlds=(2, 3, 8)) -> None:
    for name, tensor in whole.items():
        flat = tensor.reshape(-1).float()
        for world in worlds:
            joined = partitions(source, name, world)
            assert torch.equal(joined[:flat.numel()], flat), (name, world)
            assert joined[flat.numel():].isnan().all(), (name, world)  # the padding is not written


def test_a_partition_may_split_a_row_and_the_last_is_padded():
    tensor = torch.arange(35.0).reshape(7, 5)
    source = TensorWeights({"w": tensor})
    assert partition_range(35, 18, 0) == (0, 18) and partition_range(35, 18, 1) == (18, 17)  # row 3 split, padded
    assert partition_range(35, 5, 7) == (35, 0)  # 8 ranks: the last holds padding only
    assert torch.equal(source.flat("w", 13, 9), torch.arange(13.0, 22.0))  # rows 2-4, the first and last split
    assert_partitions_rebuild(source, {"w": tensor}, worlds=(1, 2, 3, 4, 6, 8, 35, 40))


@pytest.fixture(scope="module")
def folders(prepared_small, tmp_path_factory) -> dict[str, Path]:
    """transformers folders as save_pretrained writes them, and an llmtrain export in bf16."""
    root, tokenizer = tmp_path_factory.mktemp("sliced"), prepared_small / "tokenizer.model"
    for kind in ("llama", "gpt2", "gpt2_untied_bin"):
        save_random_hf(kind, root / kind, tokenizer, VOCAB)
    save_random_hf("llama", root / "sharded", tokenizer, VOCAB, seed=1).save_pretrained(root / "sharded",
                                                                                         max_shard_size="100KB")
    save_random_hf("gpt2", root / "fp16", tokenizer, VOCAB, seed=2).half().save_pretrained(root / "fp16")
    save_consolidated(load_trained(root / "gpt2"), root / "export", dtype="bf16")
    return {name: root / name for name in ("llama", "gpt2", "gpt2_untied_bin", "sharded", "fp16", "export")}


@pytest.mark.parametrize(("folder", "block_size"), [("llama", 0), ("gpt2", 0), ("gpt2", 32), ("sharded", 0),
                                                    ("fp16", 0), ("export", 100)])
def test_slices_equal_the_whole_load_bitwise(folders, folder, block_size):
    if folder == "sharded":
        assert (folders[folder] / "model.safetensors.index.json").is_file()
    opened = open_trained(folders[folder], block_size=block_size)
    whole = load_trained(folders[folder], block_size=block_size)
    assert isinstance(opened.state_dict, SafetensorsWeights) and opened.model_cfg == whole.model_cfg
    assert list(opened.state_dict) == list(whole.state_dict)
    for name, tensor in whole.state_dict.items():
        assert opened.state_dict.shape(name) == tensor.shape, name
        assert torch.equal(opened.state_dict[name], tensor.float()), name  # fp32, the values of the whole load
    assert_partitions_rebuild(opened.state_dict, whole.state_dict)


def test_pickled_weights_load_whole_with_a_note(folders, caplog):
    with caplog.at_level(logging.INFO, logger="llmtrain"):
        opened = open_trained(folders["gpt2_untied_bin"])
    assert isinstance(opened.state_dict, dict)
    assert "pickled weights (.bin/.pt) cannot be read in slices; every rank loads the whole model" in caplog.text


def test_names_transformers_would_convert_load_whole_with_a_note(folders, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for file in folders["gpt2"].iterdir():
        (renamed / file.name).write_bytes(file.read_bytes())
    weights = load_file(str(folders["gpt2"] / "model.safetensors"))  # as older GPT-2 folders name them
    save_file({name.removeprefix("transformer."): tensor for name, tensor in weights.items()},
              str(renamed / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="llmtrain"):
        opened = open_trained(renamed)
    assert "its safetensors names are not all the ones llmtrain maps" in caplog.text
    whole = load_trained(folders["gpt2"]).state_dict
    assert all(torch.equal(opened.state_dict[name], tensor) for name, tensor in whole.items())


def test_copy_weights_reads_one_tensor_at_a_time_and_checks_shapes(folders):
    opened = open_trained(folders["gpt2"], block_size=64)
    model = build_model(opened.model_cfg)
    copy_weights(model, opened.state_dict, zero_stage=0)
    whole = load_trained(folders["gpt2"], block_size=64).state_dict
    assert all(torch.equal(param, whole[name]) for name, param in model.named_parameters())
    with pytest.raises(UserError, match=r"do not fit the model: wpe.weight \(64, 64\) \(the model's: \(128, 64\)\)"):
        copy_weights(build_model(open_trained(folders["gpt2"]).model_cfg), opened.state_dict, zero_stage=0)
