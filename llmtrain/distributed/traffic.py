"""Bytes a data-parallel rank sends and receives per step, counted by the convention the parameter-server mode
measures in (``bytes_per_token`` in both modes' metrics): what crosses the rank's links, sent + received.

A ring collective over n ranks of a tensor of B bytes: a reduce-scatter or an all-gather sends (n-1)/n B and
receives as much; an all-reduce is one of each. Per step and per data-parallel rank (accumulation A):
- ZeRO-0: one all-reduce of the gradients;
- ZeRO-1: a reduce-scatter of the gradients at the accumulation boundary, an all-gather of the updated weights;
- ZeRO-2: a reduce-scatter of the gradients after every micro-batch (A of them), an all-gather of the weights;
- ZeRO-3: per micro-batch an all-gather of the weights for the forward and another for the backward, and a
  reduce-scatter of the gradients.
Gradients and weights travel in the compute dtype. Tensor- and sequence-parallel activations are not counted: this
is the data-parallel traffic only, the part that DiLoCo and Downpour replace.
"""

from __future__ import annotations


def data_parallel_bytes_per_step(params: float, dp: int, zero_stage: int, accumulation: int,
                                 dtype_bytes: int) -> float:
    """Bytes one data-parallel rank sends + receives per step; ``params``: the parameters it holds (a tensor-parallel
    rank's share)."""
    if dp == 1:
        return 0.0
    one = 2 * (dp - 1) / dp * params * dtype_bytes  # one reduce-scatter or all-gather, sent + received
    collectives = {0: 2, 1: 2, 2: accumulation + 1, 3: 3 * accumulation}[zero_stage]
    return collectives * one
