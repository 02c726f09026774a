"""What every llmtrain command shares: Hydra composition onto the typed schema, and one-line user errors.

Each command is ``hydra_command(name, config_name, schema, task)``; ``task`` receives the typed config object
(never a ``DictConfig``). Mistakes a user can fix -- an unknown key, a wrong type, a failed check, a
``UserError`` -- are printed as ``<command>: error: <one line>`` with exit code 2 (a ``UserError`` names its own
code), by the main process only: under a launcher the other ranks exit with the same code quietly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from llmtrain.config import TrainConfig, register_configs
from llmtrain.distributed.exit import linger_for_local_peers, lost_peer
from llmtrain.errors import UserError

T = TypeVar("T")
USER_ERROR_EXIT = 2
CONF_DIR = os.environ.get("LLMTRAIN_CONF_DIR", str(Path(__file__).resolve().parents[2] / "conf"))
# Flags after which Hydra does something other than run the task once (help, printing, sweeps).
_HYDRA_ONLY_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-p", "--package", "-i", "--info",
                     "-m", "--multirun", "--shell-completion", "-sc", "--resolve", "--version"}

log = logging.getLogger("llmtrain")


def one_line(exc: BaseException) -> str:
    """The first line of an exception and of its causes, joined: what a user needs, without a traceback."""
    parts: list[str] = []
    while exc is not None and len(parts) < 3:
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        # Hydra lists the choices of a group on later lines; OmegaConf repeats its message as a $VALUE template.
        options = _listed_options(lines)
        if lines and lines[0] not in parts and "$VALUE" not in lines[0]:
            parts.append(lines[0].rstrip(".") + (f"; choose one of: {', '.join(options)}" if options else ""))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)  # `from None` ends it
    return ": ".join(parts) or type(exc).__name__


def _listed_options(lines: list[str]) -> list[str]:
    """The choices Hydra lists under 'Available options in ...:' (schema entries left out)."""
    if not any(line.startswith("Available options") for line in lines):
        return []
    start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
    options = []
    for line in lines[start:]:
        if not line or line.startswith("Config search path"):
            break
        if not line.endswith("_schema"):
            options.append(line)
    return options


def fail(command: str, message: str, code: int = USER_ERROR_EXIT, every_process: bool = False) -> NoReturn:
    """Print the one line and exit ``code``. The main process says it at once. Another process first waits, so that
    the main one ends first: a launcher names it and stops the others quietly. After the wait, a refusal
    ``every_process`` of the launch reaches alike (the config, a verdict the main process shared) ends quietly, and
    any other (this process's own batch or shard) is said by this process."""
    if not _is_main_process():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's stop ends the wait, and this process, quietly
        linger_for_local_peers()
        if every_process:
            _exit(code)
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    _exit(code)


def _exit(code: int) -> NoReturn:
    """Exit ``code``. Under torchrun's elastic agent with restarts (``--max-restarts K``), a refusal -- the same at
    every restart -- is not retried: each process's agent (every node's) is asked to stop (SIGTERM), so that it ends
    the job instead of starting the ranks again into the same line."""
    if code == USER_ERROR_EXIT and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        os.kill(os.getppid(), signal.SIGTERM)
    sys.exit(code)


JOB_RANKS: str | None = None
"""The ranks the command is checked for (``llmtrain-train --check``), where no launcher says it."""


def with_job_size(message: str) -> str:
    """A layout error (it names a ``dist.`` setting) with the ranks of the job it is refused for."""
    ranks = JOB_RANKS or (f"{os.environ['WORLD_SIZE']} rank(s)" if "WORLD_SIZE" in os.environ else None)
    return f"{message} (this job: {ranks})" if ranks and "dist." in message else message


def _is_main_process() -> bool:
    if not {"RANK", "SLURM_PROCID"} & os.environ.keys():  # a single process: no launcher, no torch to import
        return True
    from llmtrain.distributed.env import launcher_rank

    return launcher_rank() == 0


def unknown_keys(cfg: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Keys present in ``cfg`` that ``schema`` does not declare (``+key=`` overrides that OmegaConf keeps)."""
    names = {f.name: f for f in dataclasses.fields(schema)}
    found = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if key not in names:
            found.append(full)
            continue
        sub_type = OmegaConf.get_type(cfg, key)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and sub_type is not None and dataclasses.is_dataclass(sub_type):
            found += unknown_keys(node, sub_type, prefix=f"{full}.")
    return found


def to_typed(cfg: DictConfig, schema: type[T]) -> T:
    """The composed config as the schema's dataclass tree: unknown keys, missing values, failed checks -> ValueError."""
    extra = unknown_keys(cfg, schema)
    if extra:
        raise ValueError(f"unknown config key(s): {', '.join(extra)} (not in {schema.__name__})")
    missing = sorted(OmegaConf.missing_keys(cfg))
    trains = isinstance(schema, type) and issubclass(schema, TrainConfig)
    if trains and "data.dir" in missing and OmegaConf.select(cfg, "data.mix") is not None:
        with read_write(cfg):
            cfg.data.dir = ""  # data.mix takes the place of data.dir (DataConfig refuses both)
        missing.remove("data.dir")
    if missing:
        hint = " or data.mix=[...]" if trains and missing[0] == "data.dir" else ""
        raise ValueError(f"missing required value(s): {', '.join(missing)} (add {missing[0]}=...{hint})")
    try:
        obj = OmegaConf.to_object(cfg)
    except ValueError:
        problems = section_problems(cfg, schema)
        if len(problems) > 1:  # each section stops at its own check: say every section's problems at once
            raise ValueError("; ".join(problems)) from None
        raise
    assert isinstance(obj, schema), type(obj)
    return obj


def section_problems(cfg: DictConfig, schema: type) -> list[str]:
    """The one-line problem of each section of ``cfg`` that fails its own checks (the root's checks need them all)."""
    problems = []
    for f in dataclasses.fields(schema):
        node = cfg._get_node(f.name)
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(cfg, f.name)):
            try:
                OmegaConf.to_object(node)
            except ValueError as exc:
                problems.append(str(exc).strip().splitlines()[0])
    return problems


def _precheck(command: str, config_name: str, schema: type, argv: list[str]) -> None:
    """Compose the config once with the Compose API so bad overrides fail as one line, not Hydra's report."""
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv if not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name=command):
            cfg = compose(config_name=config_name, overrides=overrides)
        to_typed(cfg, schema)
    except (OmegaConfBaseException, ValueError, UserError) as exc:
        fail(command, with_job_size(one_line(exc)), every_process=True)
    except Exception as exc:  # Hydra's override/composition errors have no common public base
        if type(exc).__module__.startswith(("hydra", "omegaconf")):
            fail(command, quoting_hint(overrides) or one_line(exc), every_process=True)
        raise


def quoting_hint(overrides: list[str]) -> str:
    """For the first override Hydra's grammar cannot parse (non-ASCII characters, ``;``, ``&``, ...) and that parses
    once its value is quoted: what to type instead. Empty when there is none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()

    def parses(override: str) -> bool:
        try:
            parser.parse_overrides([override])
        except Exception:  # Hydra's parse errors have no common public base
            return False
        return True

    bad = next((o for o in overrides if not parses(o)), None)
    key, sep, value = (bad or "").partition("=")
    if not sep or value.startswith(("[", "{", '"', "'")):
        return ""
    fixed = key + "=" + quote_verbatim(value, quote='"')
    if not parses(fixed):
        return ""
    return f"cannot parse {bad}: quote a value with non-ASCII or special characters: {shlex.quote(fixed)}"


def field_docs(schema: type) -> dict[str, str]:
    """The one-line docstring written under each field of a dataclass and of its dataclass bases (from source)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for cls in reversed([c for c in schema.__mro__ if dataclasses.is_dataclass(c)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def usage(command: str, doc: str, config_name: str, schema: type) -> str:
    """``--help``: the command's docstring, the config groups and every field with its default and meaning."""
    import yaml

    lines = [doc.strip(), ""]
    defaults = yaml.safe_load((Path(CONF_DIR) / f"{config_name}.yaml").read_text()).get("defaults", [])
    groups = sorted(k for d in defaults if isinstance(d, dict) for k in d if not k.startswith("override"))
    if groups:
        lines.append("Config groups (group=option):")
        for group in groups:
            options = sorted(f.stem for f in (Path(CONF_DIR) / group).glob("*.yaml"))
            lines.append(f"  {group}: {', '.join(options)}")
        lines.append("")
    lines += ["Settings (section.key=value):"]

    def walk(cls: type, prefix: str) -> None:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
                walk(f.default_factory, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            shown = "(required)" if default == "???" else f"= {getattr(default, 'value', default)!r}"
            lines.append(f"  {prefix}{f.name} {shown}\n      {docs.get(f.name, '')}")

    walk(schema, "")
    lines += ["", f"Print the composed config: {command} --cfg job [overrides]. Hydra's own flags: --hydra-help."]
    return "\n".join(lines)


def quote_verbatim(value: str, quote: str = "'") -> str:
    """``value`` as a Hydra quoted string that parses back to exactly ``value`` (no grammar, no interpolation)."""
    value = value.replace("${", "\\${")  # OmegaConf would interpolate ${...}
    value = re.sub(rf"(\\+)(?={quote}|$)", lambda m: m.group(1) * 2, value)  # Hydra unescapes only these backslashes
    return quote + value.replace(quote, "\\" + quote) + quote


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's OutOfMemoryError (CUDA) or its CPU allocator's
    RuntimeError (told by its message; torch is not imported here)."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(exc))


def run_task(command: str, task: Callable[[T], Any], typed: T) -> None:
    """``task(typed)``: a ``UserError`` ends in its one line and exit code, Ctrl-C in exit 130."""
    try:
        task(typed)
    except UserError as exc:
        fail(command, one_line(exc), exc.exit_code, exc.every_process)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if out_of_memory(exc):  # a model, batch or layout too big for the memory: the config's doing, one line
            fail(command, f"out of memory ({one_line(exc)}): the log's 'memory per rank, predicted' line breaks "
                          "the need down; a smaller model or train.micro_batch_size, or a higher dist.zero_stage, fits")
        if (lost := lost_peer(exc)) is not None:  # a node or a rank gone: name it, as fail() does, but exit 1
            linger_for_local_peers()  # a local peer killed first is the launcher's root cause
            fail(command, lost, code=1)
        # Hydra reports an unexpected error and exits 1 itself (SystemExit, never seen by ended_process as a
        # failure): linger first, so that a launcher names a killed peer, not this rank (distributed/exit.py).
        linger_for_local_peers()
        raise


def hydra_command(command: str, config_name: str, schema: type[T], task: Callable[[T], Any],
                  verbatim: tuple[str, ...] = ()) -> Callable[[], None]:
    """Build a console-script ``main`` that composes ``conf/<config_name>.yaml`` and runs ``task(typed_cfg)``.

    ``verbatim`` keys (free text such as a prompt) take the rest of their argument literally: ``prompt=def f(``
    works without the quoting Hydra's override grammar would otherwise need.
    """
    import hydra

    register_configs()

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def _hydra_main(cfg: DictConfig) -> None:
        try:
            typed = to_typed(cfg, schema)
        except (ValueError, OmegaConfBaseException) as exc:
            fail(command, with_job_size(one_line(exc)), every_process=True)
        run_task(command, task, typed)

    def main() -> None:
        # The deepspeed launcher appends --local_rank=N (also in LOCAL_RANK); Hydra takes no such flag.
        sys.argv = [a for a in sys.argv if not a.startswith(("--local_rank", "--local-rank"))]
        for i, arg in enumerate(sys.argv[1:], start=1):
            key, sep, value = arg.partition("=")
            if sep and key in verbatim:
                sys.argv[i] = f"{key}={quote_verbatim(value)}"
        argv = sys.argv[1:]
        if "-h" in argv or "--help" in argv:
            print(usage(command, sys.modules[task.__module__].__doc__ or "", config_name, schema))
            return
        if not _HYDRA_ONLY_FLAGS.intersection(argv):
            _precheck(command, config_name, schema, argv)
        sys.argv[0] = command
        _hydra_main()

    main.__doc__ = f"Entry point of `{command}`."
    return main
