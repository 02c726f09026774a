"""`llmtrain-prepare` as a user runs it: a real process, its exit code, its stderr, and what it leaves on disk."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from benchmarks._corpus import write_random_words
from tests.conftest import BIN, REPO, run_cli

pytestmark = pytest.mark.slow  # every test here starts processes (the CLI, ranks) or reads a run that did


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("llmtrain-prepare: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_prepare_stdlib_then_rerun_does_nothing(tmp_path):
    out = tmp_path / "stdlib"
    args = ["llmtrain-prepare", "data=stdlib", f"data.dir={out}", "data.max_documents=200", "data.vocab_size=1024"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["documents"] == 200 and meta["splits"]["train"]["tokens"] > 100_000
    assert f"{out}: stdlib: 200 documents, vocab 1024" in first.stdout
    assert "prepared" in first.stderr and "MB/s" in first.stderr
    second = run_cli(*args)
    assert second.returncode == 0
    assert "already prepared with this config" in second.stderr and "nothing to do" in second.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stdlib"]
    assert not (REPO / "outputs").exists()  # Hydra writes no run folder of its own


def test_help_lists_the_config(tmp_path):
    proc = run_cli("llmtrain-prepare", "--help")
    assert proc.returncode == 0
    assert "  data: hf, stdlib, text\n" in proc.stdout
    assert "  data.vocab_size = 8192\n      Tokenizer vocabulary size" in proc.stdout
    assert "  data.dir (required)\n" in proc.stdout
    for key in ("data.num_tasks = 1", "data.task = 'all'", "data.streaming = False"):
        assert f"  {key}\n      " in proc.stdout


@pytest.mark.parametrize(
    ("setup", "overrides", "fragments"),
    [
        (None, ["data=text", "data.paths=[{d}/missing.txt]"], ["no such file or folder", "missing.txt"]),
        ("empty", ["data=text", "data.paths=[{d}/c]"], ["the corpus is empty"]),
        ("corpus", ["data=text", "data.paths=[{d}/c]", "data.vocab_size=50000"],
         ["data.vocab_size=50000 is more than this corpus supports"]),
        ("corpus", ["data=text", "data.paths=[{d}/c]", "data.dir={d}/file/sub"], ["cannot be created"]),
        ("corpus", ["data=text", "data.paths=[{d}/c]", "data.unknown_key=1"], ["Key 'unknown_key' not in"]),
        ("jsonl-missing", ["data=text", "data.paths=[{d}/c]"], ["c/r.jsonl:2: the record has no 'text'"]),
        ("jsonl-object", ["data=text", "data.paths=[{d}/c]"], ["c/r.jsonl:1: the record has a dict under 'text'"]),
        ("corpus", ["data=text", "data.paths=[{d}/c]", "data.num_tasks=2", "data.task=merge"],
         ["data.task=merge: there is no complete plan in", "run data.task=plan first"]),
        ("corpus", ["data=text", "data.paths=[{d}/c]", "data.num_tasks=2"], ["needs data.task=plan, then 0..1"]),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, setup, overrides, fragments):
    (tmp_path / "file").write_text("a file, not a folder")
    if setup == "empty":
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "a.txt").write_text("")
        (tmp_path / "c" / "b.txt").write_text("")
    elif setup and setup.startswith("jsonl"):
        (tmp_path / "c").mkdir()
        records = ([{"text": "one document"}, {"body": "no text field"}] if setup == "jsonl-missing" else
                   [{"text": {"nested": "an object"}}, {"text": {"nested": "another"}}])
        (tmp_path / "c" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    elif setup == "corpus":
        (tmp_path / "c").mkdir()
        for i in range(3):
            (tmp_path / "c" / f"{i}.txt").write_text(f"document {i} with a few words in it\n" * 5)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [o.format(d=tmp_path) for o in overrides]
    if not any(a.startswith("data.dir=") for a in args):
        args.append(f"data.dir={tmp_path}/out")
    assert_one_line_error(run_cli("llmtrain-prepare", *args), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing half-written


def test_invalid_utf8_is_counted_not_fatal(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"plain document number {i}, all words fine\n" * 20)
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 3)
    proc = run_cli("llmtrain-prepare", "data=text", f"data.paths=[{corpus}]", f"data.dir={tmp_path}/out",
                   "data.vocab_size=300")
    assert proc.returncode == 0, proc.stderr
    assert "1 file(s) held invalid UTF-8 (12 sequences replaced by U+FFFD): latin1.txt" in proc.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["source"]["invalid_utf8_sequences"] == 12


def test_killed_prepare_leaves_no_complete_looking_folder(tmp_path):
    out = tmp_path / "full"
    cmd = [str(BIN / "llmtrain-prepare"), "data=stdlib", f"data.dir={out}", "data.num_proc=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".full.partial-*/tokenizer.model")) and time.time() < deadline:
        time.sleep(0.1)  # wait until it is writing: the tokenizer is saved, shards are next
    assert proc.poll() is None, "prepare finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # the target never appears half-made
    partial = list(tmp_path.glob(".full.partial-*"))
    assert len(partial) == 1 and not (partial[0] / "meta.json").exists()
    # the next run clears the dead run's staging folder and completes
    again = run_cli("llmtrain-prepare", "data=stdlib", f"data.dir={out}", "data.max_documents=50",
                    "data.vocab_size=512")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert (out / "meta.json").is_file()


def peak_rss_mb(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run a console script under a fresh python that reports its child's peak RSS (ru_maxrss, kB on Linux)."""
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")
    proc = subprocess.run([str(BIN / "python"), "-c", wrapper, str(BIN / args[0]), *args[1:]], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    return int(proc.stderr.splitlines()[-1]) / 1024, proc


def test_streaming_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak RSS of a streaming prepare of 100 MB vs 20 MB of text: less than 100 MB apart (~30 s)."""
    peaks = {}
    for megabytes in (20, 100):
        write_random_words(tmp_path / f"c{megabytes}", megabytes)
        peaks[megabytes], proc = peak_rss_mb(
            "llmtrain-prepare", "data=text", f"data.paths=[{tmp_path}/c{megabytes}]", "data.streaming=true",
            f"data.dir={tmp_path}/d{megabytes}", "data.vocab_size=512", "data.tokenizer_sample_documents=20")
        assert proc.returncode == 0, proc.stderr[-3000:]
        meta = json.loads((tmp_path / f"d{megabytes}" / "meta.json").read_text())
        assert meta["source"]["documents"] == megabytes * 10 and meta["source"]["bytes"] > megabytes * 0.99e6
    print(f"\npeak RSS: 20 MB corpus {peaks[20]:.0f} MB, 100 MB corpus {peaks[100]:.0f} MB")
    assert abs(peaks[100] - peaks[20]) < 100, peaks
