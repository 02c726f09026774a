"""Where the test suite's time goes, from a run recorded with LLMTRAIN_TEST_TIMES (tests/conftest.py):

    LLMTRAIN_TEST_TIMES=/tmp/times.jsonl .venv/bin/python -m pytest -q
    .venv/bin/python scripts/test_times.py /tmp/times.jsonl [--start-s 1=5.0 2=6.4] [--top 25]
    .venv/bin/python scripts/test_times.py /tmp/times.jsonl --junit /tmp/other.xml   # another run's seconds

Prints markdown tables (docs/testing.md): seconds by file, and by kind. The kinds: tests that start no process
(in the test process), the README's blocks (each a shell running several commands), the start of each launched
command (process start and imports: --start-s gives the fixed cost of a launch by its ranks, measured with
benchmarks/bench_startup.py), the rest of launched runs (training steps, evaluation, checkpoints), Slurm jobs
(tests/cluster), and the seconds a test slept waiting for an event.
--junit takes each test's seconds from a JUnit XML report instead (pytest --junitxml, e.g. of another commit that
has no recorder), keeping the recorded launches and sleeps (capped at those seconds) of the tests both name.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

LAUNCHERS = ("llmtrain-", "torchrun", "deepspeed", "python", "srun")
README_TEST = "tests/integration/test_readme.py"


def start_cost(launches: list[list], costs: dict[int, float]) -> float:
    """The fixed start-up seconds of a test's launched commands (an llmtrain command, torchrun, a python script)."""
    top = max(costs)
    return sum(costs.get(ranks, costs[top]) for program, ranks in launches if program.startswith(LAUNCHERS))


def junit_seconds(report: Path) -> dict[str, float]:
    """Each test's seconds in a JUnit XML report, by node id (``tests.unit.test_x`` + ``name``)."""
    return {f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}": float(case.get("time"))
            for case in ET.parse(report).getroot().iter("testcase")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("times", type=Path, help="the jsonl file LLMTRAIN_TEST_TIMES wrote")
    parser.add_argument("--start-s", nargs="+", default=["1=5.0", "2=6.4"],
                        help="fixed seconds of one launch by ranks, e.g. 1=5.0 2=6.4 (ranks above the last: the last)")
    parser.add_argument("--top", type=int, default=25, help="files shown by name (the rest summed)")
    parser.add_argument("--junit", type=Path, help="take the seconds from this JUnit XML report")
    args = parser.parse_args()
    for path in (args.times, args.junit):
        if path is not None and not path.is_file():
            parser.error(f"no such file: {path}")
    try:
        costs = {int(k): float(v) for k, v in (item.split("=") for item in args.start_s)}
    except ValueError:
        parser.error(f"--start-s takes ranks=seconds pairs, e.g. 1=5.0 2=6.4 (got {' '.join(args.start_s)})")
    tests = [json.loads(line) for line in args.times.read_text().splitlines() if line.strip()]
    if args.junit:
        seconds = junit_seconds(args.junit)
        recorded = {t["nodeid"]: t for t in tests}
        tests = [{**recorded.get(nodeid, {"launches": [], "sleep_s": 0.0}), "nodeid": nodeid, "seconds": s}
                 for nodeid, s in seconds.items()]
    total = sum(t["seconds"] for t in tests)

    by_file: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

    def add(kind: str, seconds: float, tests: int = 1) -> None:
        kinds[kind][0] += tests
        kinds[kind][1] += seconds

    for t in tests:
        file = t["nodeid"].split("::")[0]
        row = by_file[file]
        row[0] += 1
        row[1] += t["seconds"]
        row[2] += len(t["launches"])
        slept = min(t["sleep_s"], t["seconds"])
        add("waits: sleeps in the test process", slept, tests=int(slept > 0))
        rest = t["seconds"] - slept
        if file.startswith("tests/cluster/"):
            add("Slurm and multi-node jobs (tests/cluster)", rest)
        elif file == README_TEST:
            add("the README's blocks, run as pasted", rest)
        elif not t["launches"]:
            add("in the test process (no launch)", rest)
        else:
            start = min(start_cost(t["launches"], costs), rest)
            add("launched runs: process start and imports", start)
            add("launched runs: steps, evaluation, checkpoints, the rest", rest - start, tests=0)

    print(f"{len(tests)} tests, {total:.0f} s\n")
    print("| file | tests | processes started | seconds | share |\n|---|---:|---:|---:|---:|")
    ranked = sorted(by_file.items(), key=lambda kv: -kv[1][1])
    for file, (n, seconds, launches) in ranked[:args.top]:
        print(f"| {file} | {n} | {launches} | {seconds:.0f} | {seconds / total:.0%} |")
    rest = ranked[args.top:]
    if rest:
        n, seconds, launches = (sum(r[1][i] for r in rest) for i in range(3))
        print(f"| {len(rest)} other files | {n} | {launches} | {seconds:.0f} | {seconds / total:.0%} |")
    print("\n| kind | tests | seconds | share |\n|---|---:|---:|---:|")
    for kind, (n, seconds) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        print(f"| {kind} | {n or ''} | {seconds:.0f} | {seconds / total:.0%} |")


if __name__ == "__main__":
    main()
