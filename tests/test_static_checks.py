"""ruff and mypy are part of the test suite: a lint or type error fails `make test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        [str(BIN / "ruff"), "check", "."],
        [str(BIN / "ruff"), "format", "--check", "."],
        [sys.executable, "-m", "mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_static_check_passes(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"


def test_compiled_modules_ship_stubs_and_py_typed() -> None:
    package = ROOT / "egresscore"
    assert (package / "py.typed").is_file()
    for source in (package / "core").glob("*.pyx"):
        assert source.with_suffix(".pyi").is_file(), f"{source.name} has no .pyi stub"
