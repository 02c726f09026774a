"""Data-pipeline throughput on the full stdlib corpus, beside raw sentencepiece on the same text, in one run.

    .venv/bin/python benchmarks/bench_prepare.py            # ~1-2 minutes on 2 cores

Prints three tables:
1. llmtrain-prepare end to end (load + tokenize + pack + write) with num_proc 1 and 2, against
   SentencePieceProcessor.encode of the same documents with num_threads 1 and 2: MB/s, tokens/s, ratio.
   The tokenizer is trained once beforehand and reused, so both sides encode with the same model.
2. Where the time of one prepare goes, the tokenizer training included.
3. Reader throughput (windows/s) beside what training consumes.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import datasets
from _table import table  # benchmarks/ is on sys.path when a benchmark runs as a script

from llmtrain.config import DataConfig, Source
from llmtrain.data.prepare import prepare
from llmtrain.data.reader import PreparedData
from llmtrain.data.sources import decode_utf8, stdlib_files
from llmtrain.data.tokenizer import Tokenizer


def raw_encode(texts: list[str], model: Path, threads: int, repeats: int) -> tuple[float, int]:
    tokenizer = Tokenizer.load(model)
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        ids = tokenizer.encode_batch(texts, num_threads=threads)
        best = min(best, time.perf_counter() - start)
        tokens = sum(map(len, ids))
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest is kept")
    parser.add_argument("--block-size", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        # A first prepare trains the tokenizer; its stage times go in table 2.
        first = prepare(DataConfig(source=Source.stdlib, dir=str(work / "trained"), num_proc=2))
        model = first.data_dir / "tokenizer.model"
        texts = [decode_utf8(p.read_bytes())[0] for p in stdlib_files()]
        mb = sum(len(t.encode()) for t in texts) / 1e6

        rows = []
        for par in (1, 2):
            best = None
            for r in range(args.repeats):
                out = work / f"p{par}-{r}"
                rep = prepare(DataConfig(source=Source.stdlib, dir=str(out), num_proc=par, tokenizer_path=str(model)))
                if best is None or rep.total_seconds < best.total_seconds:
                    best = rep
                shutil.rmtree(out)
            tokens = best.meta["splits"]["train"]["tokens"] + best.meta["splits"]["val"]["tokens"]
            docs = best.meta["source"]["documents"]
            raw_s, raw_tokens = raw_encode(texts, model, par, args.repeats)
            pipe_mbs, raw_mbs = mb / best.total_seconds, mb / raw_s
            pipe_tok_s = (tokens - docs) / best.total_seconds  # EOD separators are not encoder output
            rows.append([par, f"{best.total_seconds:.2f}", f"{pipe_mbs:.2f}", f"{pipe_tok_s:,.0f}",
                         f"{raw_s:.2f}", f"{raw_mbs:.2f}", f"{raw_tokens / raw_s:,.0f}", f"{pipe_mbs / raw_mbs:.2f}"])
        table(f"1. prepare end to end vs raw sentencepiece.encode, stdlib: {len(texts)} files, {mb:.1f} MB",
              ["procs/threads", "prepare s", "prepare MB/s", "prepare tok/s", "raw s", "raw MB/s", "raw tok/s",
               "ratio"], rows)

        table("2. one prepare that trains its tokenizer (num_proc=2), seconds per stage",
              list(first.seconds) + ["total"],
              [[f"{v:.2f}" for v in first.seconds.values()] + [f"{first.total_seconds:.2f}"]])

        data = PreparedData(first.data_dir)
        reader = data.train_reader(args.block_size, seed=0, rank=0, world_size=1)
        rows = []
        for batch in (1, 16, 64):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < 1.0:
                reader.next_batch(batch)
                n += batch
            rate = n / (time.perf_counter() - start)
            rows.append([batch, f"{rate:,.0f}", f"{rate * args.block_size:,.0f}"])
        need = 1_000_000 / args.block_size
        table(f"3. reader, block_size {args.block_size}: windows/s (one process) vs {need:,.0f} windows/s that "
              "1M tokens/s of training (8 GPUs on gpt2-124m) would consume",
              ["batch", "windows/s", "tokens/s"], rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
