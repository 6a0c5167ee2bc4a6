"""Options shared by several commands, declared once so they read and default alike everywhere.

Numeric option types here refuse a bad value (nan, inf, out of range, not a number) with one line naming the
option in its CLI spelling, `error: --max-regression: nan is not a finite number`, and exit code 2, as a bad
file is refused (errors.UserError); click's own range types print a usage block instead.
"""
from __future__ import annotations

import math

import click


def option_name(param: click.Parameter | None) -> str:
    """The option as typed on the command line (`--img-size`), never its Python name."""
    if param is None:
        return "value"
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
    """An integer of at least `minimum` (a bool or 2.5 is not one)."""

    name = "integer"

    def __init__(self, minimum: int):
        self.minimum = minimum

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, bool):
            raise OptionValueError(param, f"{value!r} is not an integer")
        try:
            number = value if isinstance(value, int) else int(str(value).strip(), 10)
        except ValueError:
            raise OptionValueError(param, f"{value!r} is not an integer") from None
        if number < self.minimum:
            raise OptionValueError(param, f"{value} must be an integer >= {self.minimum}")
        return number


FINITE_FLOAT = FiniteFloat()
NON_NEGATIVE_FLOAT = FiniteFloat(minimum=0.0)
POSITIVE_FLOAT = FiniteFloat(minimum=0.0, above_minimum=True)
FRACTION = FiniteFloat(minimum=0.0, maximum=1.0)
COUNT = BoundedInt(1)  # epochs, images, processes, batch sizes
NON_NEGATIVE_INT = BoundedInt(0)  # seeds

recipe_option = click.option("--recipe", default="demo", show_default=True, help="Recipe name in training/ or a YAML path.")
device_option = click.option("--device", default="auto", show_default=True,
                             help="cpu, cuda, cuda:N or auto (CUDA when available).")
no_progress_option = click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
threads_option = click.option("--threads", type=COUNT, default=None,
                              help="CPU threads per runtime (default: the runtime's own).")


def echo_log(message: str) -> None:
    click.echo(message, err=False)
