"""Start-up memory of model.init_from under ZeRO-3: the whole model loaded on every rank against each rank reading
its own slices of the safetensors files, side by side in one run (CPU here; the same script runs on GPU hosts).

    .venv/bin/python benchmarks/bench_init.py     # ~4 minutes on 2 cores; ~13 GB of memory and 3 GB of disk at most

Two random Llamas that `transformers` builds and writes with `save_pretrained` (safetensors, fp32) into a temporary
folder, ~130M (`small`: 12 layers, 768 wide) and ~700M (`large`: 22 layers, 1536 wide), both with a 32000-token
vocabulary and an untied head. For each, 2 ranks under torchrun at ZeRO-3 fp32 (benchmarks/_init_probe.py) open
the folder, build the model partitioned and copy its weights in, as the trainer does with model.init_from:
`whole` calls `load_trained` (transformers loads the model, then it is renamed into ours: the path pickled weights
take), `sliced` calls `open_trained` (each rank reads its partitions' rows from the files), and `none` only builds
the model (random weights, no model.init_from): what building alone costs. Per rank: the peak resident set size
added by those steps (the RSS right before subtracted), beside the rank's partitions and the largest single tensor
of the model; target for `sliced`: added <= 1.2 x partition + largest tensor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _table import table  # benchmarks/ is on sys.path when a benchmark runs as a script

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GB = 1e9
SIZES = {"small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
         "large": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=22, num_attention_heads=16)}


def save_llama(folder: Path, size: str) -> None:
    """A random Llama of ``size`` saved by transformers, with a sentencepiece tokenizer beside it."""
    import torch
    import transformers

    from llmtrain.data.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False,
                                   bos_token_id=1, eos_token_id=1, **SIZES[size])
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    documents = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)]
    Tokenizer.train(documents, vocab_size=300).save(folder / "tokenizer.model")


def probe(folder: Path, path: str) -> list[dict]:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(REPO / "benchmarks" / "_init_probe.py"),
           str(folder), path]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{path} failed on {folder.name}:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def row(size: str, ranks: list[dict]) -> list:
    first = ranks[0]
    partition, largest = max(r["partition"] for r in ranks), first["largest"]
    added = max(r["added"] for r in ranks)
    target = 1.2 * partition + largest
    return [size, f"{first['params'] / 1e6:.0f}M", first["path"],
            " / ".join(f"{r['added'] / GB:.2f}" for r in ranks), f"{partition / GB:.2f}", f"{largest / GB:.3f}",
            f"{target / GB:.2f}", f"{added / target:.2f}", f"{max(r['seconds'] for r in ranks):.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-init-") as work:
        for size in args.sizes:
            folder = Path(work) / size
            save_llama(folder, size)
            for path in ("whole", "sliced", "none"):
                rows.append(row(size, probe(folder, path)))
            for file in folder.iterdir():  # the next model's disk
                file.unlink()
    table("model.init_from at start-up, ZeRO-3 fp32, 2 ranks: peak RSS added per rank (GB)",
          ["model", "params", "path", "added r0 / r1", "partition", "largest tensor", "1.2 x part. + largest",
           "added / that", "s"], rows)


if __name__ == "__main__":
    main()
