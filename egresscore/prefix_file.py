"""Read a prefix table from a text file: one ``PREFIX VALUE`` pair per line.

Blank lines and ``#`` comments are ignored. A bad line raises
:class:`egresscore.errors.InvalidPrefixError` naming the file and line, and nothing
is returned: a file either loads whole or not at all.
"""

from __future__ import annotations

from pathlib import Path

from egresscore.core.prefix_table import PrefixTable
from egresscore.errors import InvalidPrefixError

__all__ = ["load_prefix_file", "parse_prefix_lines"]


def parse_prefix_lines(lines: list[str], source: str = "<string>") -> PrefixTable[str]:
    """Build a table from ``PREFIX VALUE`` lines; *source* names them in errors."""
    table: PrefixTable[str] = PrefixTable()
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split(None, 1)
        if len(fields) != 2:
            raise InvalidPrefixError(
                f"{source}:{number}: expected 'PREFIX VALUE' (for example '203.0.113.0/24 partner-a'), "
                f"got {raw.rstrip()!r}"
            )
        prefix, value = fields
        try:
            duplicate = prefix in table
            table.insert(prefix, value.strip())
        except InvalidPrefixError as error:
            raise InvalidPrefixError(f"{source}:{number}: {error}") from None
        if duplicate:
            raise InvalidPrefixError(f"{source}:{number}: prefix {prefix!r} appears twice")
    return table


def load_prefix_file(path: str | Path) -> PrefixTable[str]:
    """Read *path* as ``PREFIX VALUE`` lines into a new :class:`PrefixTable`."""
    text = Path(path).read_text(encoding="utf-8")
    return parse_prefix_lines(text.splitlines(), source=str(path))
