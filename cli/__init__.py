"""The ``egresscore`` command line: parse arguments, call the library, print.

Installed as ``egresscore.cli`` (setuptools maps this directory there).
"""

from __future__ import annotations

import sys

import click

from egresscore import __version__
from egresscore.errors import EgressCoreError
from egresscore.prefix_file import load_prefix_file

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="egresscore")
def main() -> None:
    """Stable egress IPs for selected Kubernetes pods."""


@main.command()
@click.argument("table_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("addresses", nargs=-1, required=True)
def lookup(table_file: str, addresses: tuple[str, ...]) -> None:
    """Longest-prefix match of ADDRESSES against TABLE_FILE ('PREFIX VALUE' lines)."""
    try:
        table = load_prefix_file(table_file)
        for address in addresses:
            match = table.lookup_prefix(address)
            if match is None:
                click.echo(f"{address}\tno match")
            else:
                click.echo(f"{address}\t{match[0]}\t{match[1]}")
    except EgressCoreError as error:
        raise click.ClickException(str(error)) from None


@main.command()
def demo() -> None:
    """A short demonstration of the library (until the datapath demo exists)."""
    from egresscore.demo import run_demo

    run_demo(click.echo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
