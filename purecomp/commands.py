"""Command-line subcommands of ``python -m purecomp``: a registry that method packages fill.

A package calls ``register_command(name, help, add_arguments, run)``; ``purecomp.__main__``
builds one ``argparse`` subparser per registered command. The core names no command itself.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the exit code."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int]) -> Command:
    """Register ``python -m purecomp <name>``; ``ConfigError`` if the name is taken by another command."""
    command = Command(name, help, add_arguments, run)
    if name in COMMANDS and COMMANDS[name] != command:
        raise ConfigError(f"register_command({name!r})", "a different command has this name; expected a new name")
    COMMANDS[name] = command
    return command


def parser() -> argparse.ArgumentParser:
    """The ``python -m purecomp`` parser with every registered command."""
    root = argparse.ArgumentParser(prog="python -m purecomp", description="purecomp command line")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args._run(args))
