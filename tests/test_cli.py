"""The click CLI: thin, and its errors say where the input was wrong."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from egresscore.cli import main


def test_lookup_prints_longest_match_and_value(tmp_path: Path) -> None:
    table = tmp_path / "table.txt"
    table.write_text("# partner ranges\n203.0.113.0/24 partner-a\n203.0.113.128/25 excluded\n\n")
    result = CliRunner().invoke(main, ["lookup", str(table), "203.0.113.7", "203.0.113.200", "198.51.100.1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "203.0.113.7\t203.0.113.0/24\tpartner-a",
        "203.0.113.200\t203.0.113.128/25\texcluded",
        "198.51.100.1\tno match",
    ]


def test_lookup_reports_file_and_line_of_a_bad_prefix(tmp_path: Path) -> None:
    table = tmp_path / "table.txt"
    table.write_text("203.0.113.0/24 partner-a\n203.0.113.7/24 typo\n")
    result = CliRunner().invoke(main, ["lookup", str(table), "203.0.113.7"])
    assert result.exit_code != 0
    assert f"{table}:2:" in result.output
    assert "'203.0.113.7/24' has host bits set" in result.output


def test_lookup_reports_a_bad_address(tmp_path: Path) -> None:
    table = tmp_path / "table.txt"
    table.write_text("203.0.113.0/24 partner-a\n")
    result = CliRunner().invoke(main, ["lookup", str(table), "203.0.113.999"])
    assert result.exit_code != 0
    assert "'203.0.113.999'" in result.output
