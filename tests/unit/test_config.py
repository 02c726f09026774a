"""Every conf/ file composes onto the typed schema through the real CLI path; bad overrides are one line, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llmtrain.cli import prepare as prepare_cli
from llmtrain.cli._entry import CONF_DIR, _precheck, to_typed
from llmtrain.config import DataConfig, PrepareConfig, Source, register_configs

GROUP_FILES = sorted(p.stem for p in (Path(CONF_DIR) / "data").glob("*.yaml"))
REQUIRED = {"text": ["data.paths=[a.txt]"], "hf": ["data.hf_name=some/dataset"]}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="prepare", overrides=overrides)


def test_every_data_file_is_covered():
    assert GROUP_FILES == ["hf", "stdlib", "text"]


@pytest.mark.parametrize("name", GROUP_FILES)
def test_data_group_composes_to_typed(name):
    cfg = to_typed(compose([f"data={name}", "data.dir=/tmp/x", *REQUIRED.get(name, [])]), PrepareConfig)
    assert isinstance(cfg, PrepareConfig) and isinstance(cfg.data, DataConfig)
    assert cfg.data.source == Source(name)
    assert cfg.data.dir == "/tmp/x"


def test_default_is_stdlib_and_overrides_reach_the_object():
    cfg = to_typed(compose(["data.dir=d", "data.vocab_size=4096", "data.num_proc=1"]), PrepareConfig)
    assert (cfg.data.source, cfg.data.vocab_size, cfg.data.num_proc) == (Source.stdlib, 4096, 1)


def run_main(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["llmtrain-prepare", *argv])
    with pytest.raises(SystemExit) as exit_info:
        _precheck("llmtrain-prepare", "prepare", PrepareConfig, list(argv))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data.dir=d", "data.nope=1"], "Key 'nope' not in 'DataConfig'"),
        (["data.dir=d", "+data.nope=1"], "unknown config key(s): data.nope"),
        (["data.dir=d", "+top_level=1"], "unknown config key(s): top_level"),
        (["data.dir=d", "data.vocab_size=big"], "Value 'big' of type 'str' could not be converted to Integer"),
        (["data.dir=d", "data.source=ftp"], "expected one of [stdlib, text, hf]"),
        (["data=ftp", "data.dir=d"], "Could not find 'data/ftp'; choose one of: hf, stdlib, text"),
        ([], "missing required value(s): data.dir"),
        (["data=text", "data.dir=d"], "data=text needs data.paths"),
        (["data.dir=d", "data.val_fraction=1.5", "data.vocab_size=5"], "data.vocab_size=5 must be in [260, 1048576]; "
                                                                       "data.val_fraction=1.5 must be in (0, 1)"),
    ],
)
def test_bad_overrides_are_one_line_exit_2(monkeypatch, capsys, argv, message):
    code, err = run_main(monkeypatch, capsys, *argv)
    assert code == 2
    assert err.startswith("llmtrain-prepare: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


def test_valid_overrides_pass_the_precheck(monkeypatch, capsys):
    _precheck("llmtrain-prepare", "prepare", PrepareConfig, ["data.dir=d", "data.vocab_size=512"])
    assert capsys.readouterr().err == ""


def test_entry_point_is_the_hydra_command():
    assert callable(prepare_cli.main) and "llmtrain-prepare" in prepare_cli.main.__doc__
