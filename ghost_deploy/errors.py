"""Errors a user can act on, and the exit codes the CLI maps them to.

`UserError` means bad input (a file that is missing, corrupt or inconsistent): the CLI prints one line
naming the file and the problem and exits with code 2. `ParityError` means a parity gate failed: the
report is saved, and the CLI exits with code 1. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import os
import sys
import traceback

import click

EXIT_PARITY = 1
EXIT_USER = 2


class UserError(Exception):
    """Bad input: names the file (or option) and the problem in one line."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem


class ParityError(Exception):
    """A parity gate failed; `report` holds what was measured."""

    def __init__(self, message: str, report: dict | None = None):
        self.report = report or {}
        super().__init__(message)


# Set by the CLI's --debug flag: show tracebacks instead of one-line errors.
DEBUG = {"on": False}


def handle_cli_errors(func):
    """Map UserError to one line on stderr + exit 2, ParityError to exit 1; tracebacks only with --debug."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as error:
            if DEBUG["on"]:
                traceback.print_exc()
            click.echo(f"error: {error.line()}", err=True)
            sys.exit(EXIT_USER)
        except ParityError as error:
            if DEBUG["on"]:
                traceback.print_exc()
            click.echo(f"parity gate FAILED: {error}", err=True)
            sys.exit(EXIT_PARITY)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was kept", err=True)
            sys.exit(130)

    return wrapper
