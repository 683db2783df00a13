"""`http.server`: the HTTP front is chosen in the config, and the fast one refuses the config
(exit 2, naming the file, the key and the install command) when its extra is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from ingestd import cli
from ingestd.config import ConfigError, HttpConfig, load


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_the_default_front_is_waitress_and_uvloop_can_be_chosen(tmp_path: Path) -> None:
    assert HttpConfig().server == "waitress"
    assert load(write(tmp_path, '[http]\nserver = "uvloop"\n')).http.server == "uvloop"


def test_an_unknown_front_is_refused_naming_the_key(tmp_path: Path) -> None:
    p = write(tmp_path, '[http]\nserver = "gunicorn"\n')
    with pytest.raises(ConfigError) as e:
        load(p)
    assert str(p) in str(e.value) and "[http].server" in str(e.value) and "'uvloop'" in str(e.value)


def test_the_fast_front_without_its_extra_refuses_the_config_with_the_install_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec

    def without_uvloop(name: str, *args: Any) -> Any:
        return None if name == "uvloop" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_uvloop)
    p = write(tmp_path, '[http]\nserver = "uvloop"\n')
    assert cli.main(["check-config", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "[http].server" in err and "uvloop" in err, err
    assert "pip install 'ingestd[fast]'" in err, err
    # the default front needs nothing more
    assert cli.main(["check-config", "--config", str(write(tmp_path, '[http]\nserver = "waitress"\n'))]) == 0
