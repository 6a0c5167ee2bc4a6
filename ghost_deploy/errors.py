"""Errors a user can act on, and the exit codes the CLI maps them to.

`UserError` means bad input (a file that is missing, corrupt or inconsistent): the CLI prints one line
naming the file and the problem and exits with code 2. `ParityError` means a parity gate failed: the
report is saved, and the CLI exits with code 1. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os

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
