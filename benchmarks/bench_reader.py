"""What the training reader costs, side by side in one run: one prepared folder against a weighted mix, and
the data order's cost as the corpus grows (virtual corpora: sparse shards, nothing written).

    .venv/bin/python benchmarks/bench_reader.py                     # ~1 minute on 2 cores

Table 1: samples/s of ``next_batch`` (window ids + tokens from the memory maps) for `data/stdlib` alone and for
a 70/30 mix of `data/stdlib-modules` and `data/stdlib-tests` (prepared as in the README's data.mix example;
the rows are skipped when they are missing), beside what a training step of the quick-start demo consumes.
Table 2: per window count N, the time to build a reader and serve 10^4 samples, and the RSS that adds (VmRSS,
this process): the data structures that grow with N.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _table import table  # benchmarks/ is on sys.path when a benchmark runs as a script

from llmtrain.config import MixSource
from llmtrain.data.mixture import MixedData
from llmtrain.data.reader import PreparedData, TokenWindowReader
from llmtrain.data.shards import TokenSplit


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def samples_per_s(reader, batch: int, seconds: float) -> float:
    reader.next_batch(batch)  # warm: the first batch maps pages
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        reader.next_batch(batch)
        count += batch
    return count / (time.perf_counter() - start)


def throughput_rows(data_root: Path, block: int, batch: int, seconds: float) -> list[list]:
    candidates = {"data/stdlib (one folder)": lambda: PreparedData(data_root / "stdlib"),
                  "mix 0.7 modules + 0.3 tests": lambda: MixedData([
                      MixSource(dir=str(data_root / "stdlib-modules"), weight=0.7, name="modules"),
                      MixSource(dir=str(data_root / "stdlib-tests"), weight=0.3, name="tests")])}
    rows, base = [], None
    for name, open_data in candidates.items():
        try:
            data = open_data()
        except Exception as exc:  # noqa: BLE001 -- a missing folder skips its row
            print(f"skipped {name}: {exc}")
            continue
        rate = samples_per_s(data.train_reader(block, 1337, 0, 2), batch, seconds)
        base = base or rate
        rows.append([name, f"{rate:,.0f}", f"{rate / base:.2f}", f"{rate * block:,.0f}"])
    return rows


def scale_rows(sizes: list[int]) -> list[list]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as folder:
            shard = Path(folder) / "train_000.bin"
            with open(shard, "wb") as f:
                f.truncate((n + 1) * 2)  # sparse: a virtual corpus of n + 1 uint16 tokens
            meta = {"dtype": "uint16", "splits": {"train": {"shards": [{"file": shard.name, "tokens": n + 1}]}}}
            before, start = rss_mb(), time.perf_counter()
            try:
                reader = TokenWindowReader(TokenSplit.open(folder, meta, "train"), 1, seed=3, rank=0, world_size=1)
                for _ in range(100):
                    reader.next_windows(100)
            except MemoryError:
                rows.append([f"{n:.0e}", "MemoryError", "-"])
                continue
            rows.append([f"{n:.0e}", f"{(time.perf_counter() - start) * 1e3:,.1f}", f"{rss_mb() - before:,.1f}"])
            del reader
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per reader")
    parser.add_argument("--sizes", default="1e6,1e8,1e12", help="window counts of table 2 (each a virtual corpus)")
    args = parser.parse_args()
    table(f"1. reader throughput, block {args.block_size}, batch {args.batch} (the demo's micro-batch), rank 0 of 2",
          ["data", "samples/s", "vs one folder", "tokens/s"],
          throughput_rows(args.data_root, args.block_size, args.batch, args.seconds))
    print(f"(the quick-start demo trains on ~1,800 tokens/s: {1800 / args.block_size:,.0f} samples/s)")
    table("2. data order vs corpus size: build a reader over N windows and serve 10^4 samples",
          ["N windows", "ms", "RSS added (MB)"], scale_rows([int(float(s)) for s in args.sizes.split(",")]))


if __name__ == "__main__":
    main()
