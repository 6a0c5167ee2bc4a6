"""Options shared by several commands, declared once so they read and default alike everywhere.

Numeric option types here refuse a bad value (nan, inf, out of range, not a number) with one line naming the
option in its CLI spelling, `error: --max-regression: nan is not a finite number`, and exit code 2, as a bad
file is refused (errors.UserError); click's own range types print a usage block instead.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import click

from ghost_deploy.errors import UserError


def option_name(param: click.Parameter | None) -> str:
    """The option as typed on the command line (`--img-size`), never its Python name."""
    if param is None:
        return "value"
    if isinstance(param, click.Argument):
        return param.human_readable_name  # LABELS_DIR, as the usage line spells it
    spellings = getattr(param, "opts", None) or [param.name or "value"]
    return next((spelling for spelling in spellings if spelling.startswith("--")), spellings[0])


class OptionValueError(click.BadParameter):
    """A bad option value shown as one line naming the option; exit code 2 (click's usage-error code)."""

    def __init__(self, param: click.Parameter | None, problem: str):
        super().__init__(problem, param=param)
        self.option = option_name(param)
        self.problem = problem

    def show(self, file=None) -> None:
        click.echo(f"error: {self.option}: {self.problem}", err=True)


class FiniteFloat(click.ParamType):
    """A finite float (nan and inf refused), optionally at least (or above) `minimum` and at most `maximum`."""

    name = "number"

    def __init__(self, minimum: float | None = None, above_minimum: bool = False, maximum: float | None = None):
        self.minimum, self.above_minimum, self.maximum = minimum, above_minimum, maximum

    def convert(self, value, param, ctx) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise OptionValueError(param, f"{value!r} is not a number") from None
        if not math.isfinite(number):
            raise OptionValueError(param, f"{value} is not a finite number")
        if self.minimum is not None and (number < self.minimum or self.above_minimum and number == self.minimum):
            raise OptionValueError(param, f"{value} must be {'>' if self.above_minimum else '>='} {self.minimum:g}")
        if self.maximum is not None and number > self.maximum:
            raise OptionValueError(param, f"{value} must be <= {self.maximum:g}")
        return number


class BoundedInt(click.ParamType):
    """An integer of at least `minimum` and at most `maximum`, where given (a bool or 2.5 is not one)."""

    name = "integer"

    def __init__(self, minimum: int | None = None, maximum: int | None = None):
        self.minimum, self.maximum = minimum, maximum

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, bool):
            raise OptionValueError(param, f"{value!r} is not an integer")
        try:
            number = value if isinstance(value, int) else int(str(value).strip(), 10)
        except ValueError:
            raise OptionValueError(param, f"{value!r} is not an integer") from None
        if self.maximum is not None and self.minimum is not None and not self.minimum <= number <= self.maximum:
            raise OptionValueError(param, f"{value} must be an integer in {self.minimum}..{self.maximum}")
        if self.minimum is not None and number < self.minimum:
            raise OptionValueError(param, f"{value} must be an integer >= {self.minimum}")
        return number


class PathOf(click.ParamType):
    """A path that must be a folder (`folder=True`) or a file where something already exists: the wrong kind is one
    line naming the option (click.Path prints its usage block). A missing path passes: the command makes it, or
    names it missing."""

    def __init__(self, folder: bool):
        self.folder = folder
        self.name = "folder" if folder else "file"

    def convert(self, value, param, ctx) -> str:
        path = os.fspath(value)
        if path == "":
            raise OptionValueError(param, f"an empty path is not a {self.name}")
        if self.folder and os.path.exists(path) and not os.path.isdir(path):
            raise OptionValueError(param, f"{path} is a file, not a folder")
        if not self.folder and os.path.isdir(path):
            raise OptionValueError(param, f"{path} is a folder, not a file")
        return path


FINITE_FLOAT = FiniteFloat()
NON_NEGATIVE_FLOAT = FiniteFloat(minimum=0.0)
POSITIVE_FLOAT = FiniteFloat(minimum=0.0, above_minimum=True)
FRACTION = FiniteFloat(minimum=0.0, maximum=1.0)
COUNT = BoundedInt(1)  # epochs, images, processes, batch sizes
NON_NEGATIVE_INT = BoundedInt(0)  # seeds
FOLDER = PathOf(folder=True)  # output folders (and input folders), never an existing file
FILE = PathOf(folder=False)  # output files (and input lists), never an existing folder

class Device(click.ParamType):
    """auto, cpu, cuda, cuda:N or mps: anything else is one line naming --device (torch's own error is a traceback)."""

    name = "device"

    def convert(self, value, param, ctx) -> str:
        text = str(value).strip()
        if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
            return text
        raise OptionValueError(param, f"{value!r} is not a device (use cpu, cuda, cuda:N, mps or auto)")


def refuse_overwriting_inputs(option: str, out, inputs: dict) -> None:
    """An output that is one of the command's input files is refused before any work: the input would be lost.
    `inputs`: {what it is: path or None}."""
    target = Path(out).resolve()
    for what, path in inputs.items():
        if path is not None and Path(path).resolve() == target:
            raise UserError(option, f"{out} would overwrite the {what} ({path}); choose another {option}")


recipe_option = click.option("--recipe", default="demo", show_default=True, help="Recipe name in training/ or a YAML path.")
device_option = click.option("--device", type=Device(), default="auto", show_default=True,
                             help="cpu, cuda, cuda:N or auto (CUDA when available).")
no_progress_option = click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
threads_option = click.option("--threads", type=COUNT, default=None,
                              help="CPU threads per runtime (default: the runtime's own).")


def echo_log(message: str) -> None:
    click.echo(message, err=False)
