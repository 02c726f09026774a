"""The README's shell blocks, run as a user pastes them (in the spirit of litgpt's tests/test_readme.py).

    .venv/bin/python -m pytest -q tests/integration/test_readme.py -x        # 7-10 minutes on 2 shared cores

Every ```bash / ```sh / ```console block of README.md runs, in README order, with `bash -euo pipefail` in one
fresh folder: a copy of the checkout's files (tracked, and untracked ones git does not ignore) with `.venv`
linked in, so `.venv/bin/...` works there and each block sees what the blocks above it made. WANDB_MODE is
disabled and the Hugging Face hub offline: nothing a block runs may need the network. A block whose
preceding line is `<!-- readme-test: skip (reason) -->` is not run: the quick start (it installs and trains for
minutes), and what needs a GPU, several machines, Slurm or the network.

In a ```console block, lines that start with `$ ` are commands (a trailing backslash continues one) and every
other line is output that must appear in what they print; `...` in an output line stands for anything.

The fast tests below check the README's shape without running anything: skip markers with reasons, the quick
start's test command being the one `.ci/run` runs, and the links of README.md and docs/ (files and anchors).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
VENV_BIN = REPO / ".venv" / "bin"
BLOCK_TIMEOUT_S = 300  # the README promises under a minute each; the margin is for shared cores
SHELL_LANGS = ("bash", "sh", "console")
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")

# What a block must print, where it is cheap to say: (a fragment of the block's code, a fragment of its output).
EXPECTED_OUTPUT = [
    ("--cfg job", "name: mini"),
    ("llmtrain-prepare data=stdlib data.dir=data/stdlib ", "meta.json ok"),
    ("data.task=merge", "the same shards as one process"),
    ("data.streaming=true", "meta.json ok"),
    ("data.mix=", "(modules "),
    ("mode=async_ps", "skipped step(s)"),
    ("llmtrain-compare", "| async |"),
    ("run.dir=runs/tiny model=tiny", "skipped step(s)"),
    ("run.dir=runs/tiny-z2", "skipped step(s)"),
    ("run.dir=runs/tiny-ds", "skipped step(s)"),
    ("run.dir=runs/tiny-tp2", "skipped step(s)"),
    ("run.dir=runs/tiny-moe", '"moe/1/load/3": '),
    ("model=lstm", "skipped step(s)"),
    ("format=hf out=exports/tiny-hf", "GPT2LMHeadModel"),
    ("llmtrain-ngram", "3-gram"),
    ("model.init_from=runs/llama-ckpt", "skipped step(s)"),
    ("train.stop_at_step=10", "resumed from"),
]


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None  # the reason, when marked
    expected: list[str] = field(default_factory=list)  # console blocks: the output lines shown

    @property
    def name(self) -> str:
        return f"L{self.line}-{self.lang}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced shell blocks of a Markdown text, with their skip markers and (console) expected output."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, lang = i, fence.group(1)
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if lang not in SHELL_LANGS:
            continue
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = SKIP_MARK.search(prev)
        block = Block(line=start + 1, lang=lang, code="\n".join(body) + "\n",
                      skip=mark.group("reason").strip() if mark else None)
        if lang == "console":
            block.code, block.expected = _console(body)
        blocks.append(block)
    return blocks


def _console(body: list[str]) -> tuple[str, list[str]]:
    """Split a console transcript into its commands (`$ ` lines and their continuations) and output lines."""
    commands, expected, continued = [], [], False
    for line in body:
        if line.startswith("$ ") or continued:
            command = line[2:] if line.startswith("$ ") and not continued else line
            commands.append(command)
            continued = command.rstrip().endswith("\\")
        elif line.strip():
            expected.append(line.strip())
    return "\n".join(commands) + "\n", expected


def _appears(expected: str, output: str) -> bool:
    """Whether an expected output line appears in ``output``, whitespace collapsed, `...` matching anything."""
    squash = " ".join
    pattern = ".*?".join(re.escape(squash(part.split())) for part in expected.split("..."))
    return re.search(pattern, squash(output.split())) is not None


def test_blocks_are_found_and_every_skip_has_a_reason():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 20, [b.name for b in blocks]
    assert any(b.skip is None for b in blocks)
    for block in blocks:
        assert block.skip is None or len(block.skip) > 3, block.name
    # A marker is meant for the block right after it: one followed by prose (or nothing) is a mistake.
    lines = README.read_text().splitlines()
    for n, line in enumerate(lines):
        if SKIP_MARK.search(line):
            following = next((x for x in lines[n + 1:] if x.strip()), "")
            assert re.match(r"^```(bash|sh|console)\s*$", following), f"README.md:{n + 1}: a skip marker before prose"


def test_quick_start_runs_what_ci_runs():
    """The quick start's two commands: the test one is exactly `.ci/run`'s last line; both are skipped here."""
    quick = readme_blocks(README.read_text())[:2]
    assert all(b.skip for b in quick)
    assert "experiment=demo" in quick[0].code and quick[0].code.startswith("bash scripts/setup.sh && ")
    ci_last = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()][-1]
    assert quick[1].code.strip() == ci_last.strip()


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_links_in_readme_and_docs_resolve():
    pages = [README, *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved.read_text()):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# ---- the blocks, run --------------------------------------------------------------------------------------------

_BLOCKS = readme_blocks(README.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A fresh copy of the checkout (as a clone plus uncommitted work would be) with `.venv` linked in."""
    root = tmp_path_factory.mktemp("readme") / "llmtrain"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is gone for a user too
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / ".venv").symlink_to(REPO / ".venv")
    # The README calls everything as .venv/bin/..., so PATH stays the user's: with the venv's bin first, DeepSpeed's
    # JIT build of its CPU ops would run the venv's ninja instead of the system's, and two ninja versions sharing
    # one torch_extensions folder discard each other's build log and rebuild the ops (a minute each) every time.
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MASTER_PORT": str(_free_port())}
    env.pop("PYTHONPATH", None)
    return {"root": root, "env": env, "failed": None}


@pytest.mark.slow
@pytest.mark.skipif(not (VENV_BIN / "python").exists(), reason="needs the set-up .venv (bash scripts/setup.sh)")
@pytest.mark.parametrize("block", _BLOCKS, ids=[b.name for b in _BLOCKS])
def test_readme_block_runs(block: Block, workspace: dict):
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    if workspace["failed"]:
        pytest.skip(f"an earlier block failed ({workspace['failed']}); later blocks build on it")
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=workspace["root"],
                              env=workspace["env"], capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        workspace["failed"] = block.name
        pytest.fail(f"README.md:{block.line}: still running after {BLOCK_TIMEOUT_S} s\n{block.code}\n"
                    f"{(e.stdout or b'')[-2000:]!r}\n{(e.stderr or b'')[-2000:]!r}")
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        workspace["failed"] = block.name
    assert proc.returncode == 0, (f"README.md:{block.line}: exit code {proc.returncode}\n{block.code}\n"
                                  f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}")
    missing = [line for line in block.expected if not _appears(line, output)]
    missing += [want for code, want in EXPECTED_OUTPUT if code in block.code and want not in output]
    assert not missing, f"README.md:{block.line}: not in the output: {missing}\n{block.code}\n{output[-4000:]}"
