"""The command line: ``bayescurv --version`` and ``python -m bayescurv --version``."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

import bayescurv
from bayescurv import cli


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"bayescurv {metadata.version('bayescurv')}"


def test_version_falls_back_to_dunder_version(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert cli.version() == bayescurv.__version__


def test_python_m_bayescurv_version():
    out = subprocess.run([sys.executable, "-m", "bayescurv", "--version"], capture_output=True,
                         text=True, check=True, timeout=300)
    assert out.stdout.strip() == f"bayescurv {cli.version()}"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "usage: bayescurv" in capsys.readouterr().err
