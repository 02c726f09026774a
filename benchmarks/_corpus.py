"""Generated corpora for measurements that need text of a chosen size (shared by bench_prepare.py and the
streaming-memory test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_random_words(folder: Path, megabytes: int, doc_bytes: int = 100_000) -> None:
    """``megabytes`` of random-word documents over a 3,000-word vocabulary, one ~``doc_bytes`` .txt file each."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(3000)]
    folder.mkdir()
    for i in range(megabytes * 1_000_000 // doc_bytes):
        (folder / f"{i:05d}.txt").write_text(" ".join(rng.choice(vocab, size=doc_bytes // 6)) + "\n")
