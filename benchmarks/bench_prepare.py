"""Data-pipeline throughput on the full stdlib corpus, beside raw sentencepiece on the same text, in one run.

    .venv/bin/python benchmarks/bench_prepare.py            # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_prepare.py --tables 4,5

Prints five tables:
1. llmtrain-prepare end to end (load + tokenize + pack + write) with num_proc 1 and 2, against
   SentencePieceProcessor.encode of the same documents with num_threads 1 and 2: MB/s, tokens/s, ratio.
   The tokenizer is trained once beforehand and reused, so both sides encode with the same model.
2. Where the time of one prepare goes, the tokenizer training included.
3. Reader throughput (windows/s) beside what training consumes.
4. llmtrain-prepare as K = 1 process vs K = 2 tasks (data.num_tasks=2: plan, the 2 tasks run concurrently as
   processes, merge), each a real llmtrain-prepare process (start-up included), the tokenizer trained in both.
5. Streaming (data.streaming=true) vs not: peak RSS and MB/s, on the stdlib and on generated random-word text.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
from _corpus import write_random_words
from _table import table  # benchmarks/ is on sys.path when a benchmark runs as a script

from llmtrain.config import DataConfig, Source
from llmtrain.data.prepare import prepare
from llmtrain.data.reader import PreparedData
from llmtrain.data.sources import decode_utf8, stdlib_files
from llmtrain.data.tokenizer import Tokenizer

PREPARE = [str(Path(sys.executable).parent / "llmtrain-prepare")]


def raw_encode(texts: list[str], model: Path, threads: int, repeats: int) -> tuple[float, int]:
    tokenizer = Tokenizer.load(model)
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        ids = tokenizer.encode_batch(texts, num_threads=threads)
        best = min(best, time.perf_counter() - start)
        tokens = sum(map(len, ids))
    return best, tokens


def run_prepare(*overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.Popen([*PREPARE, *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)


def wait_ok(*procs: subprocess.Popen) -> None:
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"llmtrain-prepare failed: {err[-2000:]}")


def timed(*procs_factory) -> float:
    start = time.perf_counter()
    wait_ok(*[make() for make in procs_factory])
    return time.perf_counter() - start


def tasks_table(work: Path, mb: float, repeats: int) -> None:
    rows = []
    for num_proc in (1, 2):
        best = min(timed(lambda n=num_proc, r=r: run_prepare(f"data.dir={work}/k1-{n}-{r}", f"data.num_proc={n}"))
                   for r in range(repeats))
        rows.append([1, num_proc, "-", "-", "-", f"{best:.2f}", f"{mb / best:.2f}"])
    runs = []
    for r in range(repeats):
        args = [f"data.dir={work}/k2-{r}", "data.num_proc=1", "data.num_tasks=2"]
        plan = timed(lambda a=args: run_prepare(*a, "data.task=plan"))
        tasks = timed(lambda a=args: run_prepare(*a, "data.task=0"), lambda a=args: run_prepare(*a, "data.task=1"))
        merge = timed(lambda a=args: run_prepare(*a, "data.task=merge"))
        runs.append((plan + tasks + merge, plan, tasks, merge))
    total, plan, tasks, merge = min(runs)
    rows.append([2, 1, f"{plan:.2f}", f"{tasks:.2f}", f"{merge:.2f}", f"{total:.2f}", f"{mb / total:.2f}"])
    table(f"4. llmtrain-prepare data=stdlib ({mb:.1f} MB, tokenizer trained) as K processes; fastest of {repeats}; "
          "each phase a process", ["K", "num_proc", "plan s", "tasks s (concurrent)", "merge s", "total s", "MB/s"],
          rows)


def peak_rss(*overrides: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one llmtrain-prepare process."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
               "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *PREPARE, *overrides], capture_output=True, text=True,
                         check=True, env={**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
    return time.perf_counter() - start, int(out.stdout.split()[-1]) / 1024


def streaming_table(work: Path, stdlib_mb: float, words_mb: int) -> None:
    write_random_words(work / "words", words_mb)
    corpora = [("stdlib", stdlib_mb, ["data=stdlib"]),
               (f"random words, {words_mb * 10} files of 100 kB", words_mb, ["data=text", f"data.paths=[{work}/words]",
                                                                       "data.tokenizer_sample_documents=30"])]
    rows = []
    for name, mb, args in corpora:
        for streaming in (False, True):
            out = work / f"s-{len(rows)}"
            seconds, rss = peak_rss(*args, f"data.dir={out}", f"data.streaming={str(streaming).lower()}",
                                    "data.num_proc=2")
            rows.append([name, "yes" if streaming else "no", f"{mb:.1f}", f"{seconds:.1f}", f"{mb / seconds:.2f}",
                         f"{rss:,.0f}"])
            shutil.rmtree(out)
    table("5. streaming vs not (num_proc=2, vocab 8192; one process each, start-up included)",
          ["corpus", "streaming", "MB", "s", "MB/s", "peak RSS MB"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest is kept")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--tables", default="1,2,3,4,5", help="which tables to print, e.g. 4,5")
    parser.add_argument("--words-mb", type=int, default=100, help="size of the generated corpus of table 5")
    args = parser.parse_args()
    tables = {int(t) for t in args.tables.split(",")}
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        texts = [decode_utf8(p.read_bytes())[0] for p in stdlib_files()]
        mb = sum(len(t.encode()) for t in texts) / 1e6
        if tables & {1, 2, 3}:
            pipeline_tables(work, texts, mb, args)
        if 4 in tables:
            tasks_table(work, mb, args.repeats)
        if 5 in tables:
            streaming_table(work, mb, args.words_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pipeline_tables(work: Path, texts: list[str], mb: float, args: argparse.Namespace) -> None:
    # A first prepare trains the tokenizer; its stage times go in table 2.
    first = prepare(DataConfig(source=Source.stdlib, dir=str(work / "trained"), num_proc=2))
    model = first.data_dir / "tokenizer.model"
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


if __name__ == "__main__":
    main()
