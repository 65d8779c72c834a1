"""The ``egresscore`` command line: parse arguments, call the library, print.

Installed as ``egresscore.cli`` (setuptools maps this directory there).
"""

from __future__ import annotations

import sys

import click

from egresscore import __version__
from egresscore.errors import EgressCoreError, PolicyErrorGroup
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
@click.option(
    "-f",
    "--file",
    "files",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="Policy, inventory or ClusterNetwork file (YAML or JSON); repeat for several.",
)
@click.option("--node", "local_node", default=None, help="Decide as this node (its gateway flows are SNAT).")
@click.argument("source")
@click.argument("destination")
def explain(files: tuple[str, ...], local_node: str | None, source: str, destination: str) -> None:
    """Say what happens to a packet from SOURCE to DESTINATION, and why."""
    from egresscore.policy.explain import explain as explain_packet
    from egresscore.policy.loader import load_files

    try:
        policy_set = load_files(files)
        click.echo(str(explain_packet(policy_set, source, destination, local_node)))
    except PolicyErrorGroup as group:
        for error in group.errors:
            click.echo(str(error), err=True)
        raise click.ClickException(f"{len(group.errors)} error(s) in the policy files") from None
    except EgressCoreError as error:
        raise click.ClickException(str(error)) from None


@main.group()
def policy() -> None:
    """Policy files: validate them."""


@policy.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(files: tuple[str, ...]) -> None:
    """Check FILES (YAML or JSON documents); print every error with its location."""
    from egresscore.policy.compiler import compile_policies
    from egresscore.policy.loader import load_files, validate_files

    errors = validate_files(files)
    if errors:
        for error in errors:
            click.echo(str(error))
        raise click.ClickException(f"{len(errors)} error(s) in {len(files)} file(s)")
    policy_set = load_files(files)
    classifier = compile_policies(policy_set)
    inventory = policy_set.inventory
    click.echo(
        f"ok: {len(policy_set.policies)} policies ({classifier.policy_count} compiled), "
        f"{len(inventory.endpoints)} endpoints, {len(inventory.namespaces)} namespaces, "
        f"{len(inventory.nodes)} nodes, {len(classifier.gateways)} gateway addresses"
    )


ROLE_CHOICE = click.Choice(["node", "gateway", "both"])
CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="The agent's configuration file (docs/agent.md).",
)


@main.command()
@click.option("--role", type=ROLE_CHOICE, required=True, help="What this node does.")
@CONFIG_OPTION
@click.option("--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True)
def run(role: str, config_file: str, log_format: str) -> None:
    """Run the agent in the foreground until SIGTERM or SIGINT.

    node: decides each local pod's flow once and redirects the selected ones through
    the tunnel to their gateway. gateway: translates them to the egress IPs. both: a
    node that is also a gateway. The policy files are reloaded when they change (and
    on SIGHUP). Logs are JSON lines on standard error.
    """
    import signal

    from egresscore.agent import Agent, load_config
    from egresscore.agent.log import EventLog

    log = EventLog(text=log_format == "text")
    try:
        config = load_config(config_file)
        agent = Agent(config, role, log)
    except EgressCoreError as error:
        raise click.ClickException(str(error)) from None
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    signal.signal(signal.SIGHUP, agent.request_reload)
    failed = False
    try:
        agent.start()
        agent.run()
    except PolicyErrorGroup as group:
        log.error("failed", error=str(group), errors=[str(e) for e in group.errors])
        failed = True
    except (EgressCoreError, OSError) as error:
        log.error("failed", error=str(error))
        failed = True
    except Exception as error:  # a netlink error, a bug: logged, and the stop still runs
        log.error("failed", error=f"{type(error).__name__}: {error}")
        failed = True
    finally:
        agent.stop()
    if failed:
        sys.exit(1)


@main.command()
@click.option("--role", type=ROLE_CHOICE, default="both", show_default=True, help="Whose state to remove.")
@CONFIG_OPTION
def cleanup(role: str, config_file: str) -> None:
    """Remove everything egresscore installed on this host (after a stop with
    failure_mode: closed, its rules stay to keep selected pods from leaking).

    Refuses while an agent runs. Prints each thing removed.
    """
    from egresscore.agent import cleanup as cleanup_host
    from egresscore.agent import load_config
    from egresscore.agent.log import EventLog

    try:
        config = load_config(config_file)
        removed = cleanup_host(config, role, EventLog())
    except EgressCoreError as error:
        raise click.ClickException(str(error)) from None
    for item in removed:
        click.echo(f"removed {item}")
    if not removed:
        click.echo("nothing of egresscore's was left on this host")


@main.command()
@CONFIG_OPTION
def status(config_file: str) -> None:
    """Print the running agent's workers: state, counters (from its state directory)."""
    import json

    from egresscore.agent import load_config

    try:
        config = load_config(config_file)
    except EgressCoreError as error:
        raise click.ClickException(str(error)) from None
    files = sorted(config.state_dir.glob("status-*.json"))
    if not files:
        raise click.ClickException(f"no status files in {config.state_dir}: is an agent running?")
    for path in files:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            click.echo(f"{path.name}: unreadable ({error})")
            continue
        role = "node" if path.name.startswith("status-node-") else "gateway"
        counters = record.get("datapath", {})
        busy = {k: v for k, v in counters.items() if v and not k.startswith("queue_")}
        click.echo(
            f"{role} queue {record.get('queue')}: {record.get('state')}, pid {record.get('pid')}"
            + (f", {record['entries']} SNAT entries" if "entries" in record else "")
        )
        for key, value in sorted(busy.items()):
            click.echo(f"  {key}: {value}")


@main.command()
def demo() -> None:
    """A short demonstration of the library (until the datapath demo exists)."""
    from egresscore.demo import run_demo

    run_demo(click.echo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
