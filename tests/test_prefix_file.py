"""Prefix files load whole or not at all, and errors name the file and line."""

from __future__ import annotations

import ipaddress

import pytest

from egresscore.errors import InvalidPrefixError
from egresscore.prefix_file import parse_prefix_lines


def test_comments_and_blank_lines_are_ignored() -> None:
    table = parse_prefix_lines(
        ["# header", "", "198.51.100.0/24  gateway a  # trailing", "2001:db8::/32 six"]
    )
    assert list(table) == [
        (ipaddress.ip_network("198.51.100.0/24"), "gateway a"),
        (ipaddress.ip_network("2001:db8::/32"), "six"),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("198.51.100.0/24", "expected 'PREFIX VALUE'"),
        ("198.51.100.0/33 x", "invalid prefix length in '198.51.100.0/33'"),
        ("not-a-prefix x", "invalid prefix 'not-a-prefix'"),
    ],
)
def test_bad_line_names_source_and_line(line: str, expected: str) -> None:
    with pytest.raises(InvalidPrefixError) as caught:
        parse_prefix_lines(["203.0.113.0/24 ok", line], source="policies.txt")
    assert str(caught.value).startswith("policies.txt:2: ")
    assert expected in str(caught.value)


def test_duplicate_prefix_is_an_error() -> None:
    with pytest.raises(InvalidPrefixError, match=r"t:3: prefix '203.0.113.0/24' appears twice"):
        parse_prefix_lines(["203.0.113.0/24 a", "198.51.100.0/24 b", "203.0.113.0/24 c"], source="t")
