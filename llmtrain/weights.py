"""Weights read when they are used: a ``WeightSource`` hands out one tensor, or a range of its rows, at a time.

A trained model that starts a run (``model.init_from``) is opened as one (``llmtrain.run.trained.open_trained``):
its safetensors file(s) are read one tensor, or one slice, at a time while the weights are copied into the model
(``llmtrain.distributed.deepspeed.copy_weights``), so no process holds the whole model twice, and under ZeRO-3 each
rank reads only the slices of its own partitions (``flat``). Weights already in memory are a ``TensorWeights``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from llmtrain.hf_mapping import WeightPair, our_shape, rows_of_pair


class WeightSource(Mapping[str, torch.Tensor]):
    """Weights by our parameter names. ``source[name]`` reads a whole tensor, ``rows`` a range of its rows (dim 0),
    ``flat`` a range of its row-major elements; ``shape`` reads nothing."""

    def __init__(self, names: list[str]) -> None:
        self._names = list(names)
        self._heights: dict[str, int] = {}
        """Tensors cut to their first rows (``first_rows``)."""

    def shape(self, name: str) -> torch.Size:
        shape = self._stored_shape(name)
        return torch.Size((self._heights.get(name, shape[0]), *shape[1:])) if shape else shape

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of ``name`` (elements, for a 1-d tensor)."""
        assert 0 <= r0 <= r1 <= self.shape(name)[0], (name, r0, r1, self.shape(name))
        return self._read_rows(name, r0, r1)

    def flat(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements ``start:start + count`` of ``name`` flattened in row-major order (a ZeRO-3 partition), reading
        only the rows that hold them: the first and last may be split."""
        if count == 0:
            return self.rows(name, 0, 0).reshape(-1)
        row = math.prod(self.shape(name)[1:])
        r0, r1 = start // row, -(-(start + count) // row)
        offset = start - r0 * row
        return self.rows(name, r0, r1).reshape(-1)[offset:offset + count]

    def first_rows(self, name: str, height: int) -> WeightSource:
        """This source with ``name`` cut to its first ``height`` rows."""
        assert height <= self.shape(name)[0], (name, height)
        cut = copy.copy(self)
        cut._heights = {**self._heights, name: height}
        return cut

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self.rows(name, 0, self.shape(name)[0])

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def _stored_shape(self, name: str) -> torch.Size:
        raise NotImplementedError

    def _read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        raise NotImplementedError


class TensorWeights(WeightSource):
    """Weights already in memory, by name, handed out as they are (views, in their own dtype)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__(list(tensors))
        self._tensors = tensors

    def _stored_shape(self, name: str) -> torch.Size:
        return self._tensors[name].shape

    def _read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        return self._tensors[name][r0:r1]


class SafetensorsWeights(WeightSource):
    """Weights in safetensors files, read in fp32 (the dtype a whole load converts to first) when asked for. Each
    stored tensor of ``files`` (its name -> its file) is one of ours, or with ``pairs`` (``llmtrain.hf_mapping``'s
    table) a piece of one: a slice of ours reads only the pieces, rows or columns it covers (``rows_of_pair``).

    Every read opens its file(s) and closes them again: pages read through a file held open stay counted in the
    process's resident memory until it is closed, which for a whole model is the model's size once more."""

    def __init__(self, files: Mapping[str, Path], pairs: list[WeightPair] | None = None) -> None:
        pairs = pairs if pairs is not None else [WeightPair(name, (name,)) for name in files]
        super().__init__([pair.ours for pair in pairs])
        self._files = dict(files)
        self._pairs = {pair.ours: pair for pair in pairs}
        self._shapes = stored_shapes(set(self._files.values()))

    def _stored_shape(self, name: str) -> torch.Size:
        return torch.Size(our_shape(self._pairs[name], self._shapes))

    def _read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        from safetensors import safe_open

        with contextlib.ExitStack() as opened:
            handles = {}

            def read(stored: str, index: tuple[slice, ...]) -> torch.Tensor:
                file = self._files[stored]
                if file not in handles:
                    handles[file] = opened.enter_context(safe_open(str(file), framework="pt"))
                return handles[file].get_slice(stored)[index].to(torch.float32)

            # rows_of_pair copies what it reads into a new tensor: none of the file's pages outlive the reads
            return rows_of_pair(self._pairs[name], self._shapes, read, r0, r1)


def stored_shapes(files: set[Path]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in ``files``, by its stored name (read from the files' headers)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(files):
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()
            shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in names})
    return shapes
