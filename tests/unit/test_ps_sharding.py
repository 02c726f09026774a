"""How the parameter-server mode splits a model among servers."""

from __future__ import annotations

import pytest

from llmtrain.config import ModelConfig
from llmtrain.model import build_model
from llmtrain.ps.server import shard_names


def test_shards_cover_every_tensor_once_and_balance_by_size():
    model = build_model(ModelConfig(n_layer=4, n_head=4, n_embd=64, block_size=32, vocab_size=1000))
    sizes = [(n, p.numel()) for n, p in model.named_parameters()]
    for servers in (1, 2, 3):
        shards = shard_names(sizes, servers)
        names = [n for shard in shards for n in shard]
        assert sorted(names) == sorted(n for n, _ in sizes)  # each tensor on exactly one server
        loads = [sum(dict(sizes)[n] for n in shard) for shard in shards]
        biggest = max(size for _, size in sizes)
        assert max(loads) - min(loads) <= biggest  # greedy: no server ahead by more than one tensor
    assert shard_names(sizes, 2) == shard_names(list(reversed(sizes)), 2)  # the same on every process


def test_more_servers_than_tensors_is_refused():
    with pytest.raises(ValueError, match="3 servers for 2 tensors"):
        shard_names([("a", 4), ("b", 2)], 3)

