"""Options shared by several commands, declared once so they read and default alike everywhere."""
from __future__ import annotations

import click

recipe_option = click.option("--recipe", default="demo", show_default=True, help="Recipe name in training/ or a YAML path.")
device_option = click.option("--device", default="auto", show_default=True,
                             help="cpu, cuda, cuda:N or auto (CUDA when available).")
no_progress_option = click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None,
                              help="CPU threads per runtime (default: the runtime's own).")


def echo_log(message: str) -> None:
    click.echo(message, err=False)
