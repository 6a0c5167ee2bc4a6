"""Errors a user can act on, and the exit codes the CLI maps them to.

`UserError` means bad input (a file that is missing, corrupt or inconsistent): the CLI prints one line
naming the file and the problem and exits with code 2. `ParityError` means a parity gate failed: the
report is saved, and the CLI exits with code 1. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import functools
import os
import sys
import traceback

import click

EXIT_PARITY = 1
EXIT_USER = 2
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ELOOP, errno.ENAMETOOLONG})


class UserError(Exception):
    """Bad input: names the file (or option) and the problem in one line."""

    def __init__(self, path: str | os.PathLike | None, problem: str | None = None):
        if problem is None:  # rebuilt from a message alone: a DataLoader worker's error (see _from_worker_message)
            path, problem = _from_worker_message(str(path))
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem


def _from_worker_message(message: str) -> tuple[None, str]:
    """PyTorch re-raises a worker's exception as `type(message)`, the message being "Caught UserError in
    DataLoader worker process N. Original Traceback ...". Its last line is ours ("...UserError: <path>: <problem>"),
    which is all the user needs: the error stays one line, not a RuntimeError traceback."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else message
    marker = "UserError: "
    return None, last.split(marker, 1)[1] if marker in last else last


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
        except OSError as error:
            # A path the system refuses that no stage translated (a folder made for output on a read-only or full
            # disk, a file where a folder should be): still one line naming it. Other OSErrors keep their traceback.
            if error.filename is None or error.errno not in ENVIRONMENT_ERRNOS or DEBUG["on"]:
                raise
            click.echo(f"error: {error.filename}: {error.strerror}", err=True)
            sys.exit(EXIT_USER)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was kept", err=True)
            sys.exit(130)

    return wrapper
