"""The `ghost-deploy` command line: thin wrappers over the stage functions.

Exit codes: 0 success, 1 a parity gate failed (the report is saved), 2 bad input (one line naming the
file and the problem; `--debug` shows the traceback).
"""
from __future__ import annotations

import importlib
import os

# Before torch or onnxruntime load OpenMP: idle threads sleep instead of spinning, so a busy machine (or ORT and
# PyTorch in one process) does not slow every parallel region several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import warnings

import click

from ghost_deploy.errors import DEBUG

# Each command lives in its stage's command module, imported only when that command runs: the torch-free ones
# (build-engine, data) then start without PyTorch, as on a Jetson with only the engine stage installed.
COMMANDS = {
    "train": ("ghost_deploy.cli.train", "train"),
    "plan": ("ghost_deploy.cli.train", "plan_command"),
    "pipeline": ("ghost_deploy.cli.train", "pipeline"),
    "export": ("ghost_deploy.cli.export", "export_command"),
    "sample": ("ghost_deploy.cli.export", "sample_command"),
    "build-engine": ("ghost_deploy.cli.engines", "build_engine"),
    "bench": ("ghost_deploy.cli.bench", "bench_command"),
    "data": ("ghost_deploy.cli.data", "data_group"),
    "calib": ("ghost_deploy.cli.calib", "calib_group"),
}


class _StageGroup(click.Group):
    """The top-level group: commands come from COMMANDS, each loaded when it is named."""

    lazy = COMMANDS

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, name):
        if name in self.lazy and name not in self.commands:

            module, attribute = self.lazy[name]
            try:
                command = getattr(importlib.import_module(module), attribute)
            except ImportError as exc:  # an engine-stage-only install (a bundle on a Jetson) has no PyTorch
                command = _missing_dependency(name, exc)
            self.add_command(command, name)
        return super().get_command(ctx, name)


@click.group(cls=_StageGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (they are one line otherwise).")
@click.version_option(package_name="ghost-deploy")
def main(debug: bool) -> None:
    """ghost-deploy: GHOST mixed-precision detectors for RGB+IR imagery, from training to TensorRT engines.

    \b
    Typical flow (each stage reads the previous stage's artifact):
      ghost-deploy train                       FP32 teacher -> HQ bit plan -> GHOST QAT with self-distillation
      ghost-deploy export --onnx RUN/ghost.safetensors   QDQ ONNX + parity gate vs PyTorch (ONNX Runtime)
      ghost-deploy build-engine --target jetson          TensorRT engine, or a deployment bundle off-device
      ghost-deploy bench                       latency, size and mAP of every form of the model
      ghost-deploy pipeline                    all of the above on the embedded demo set
    """
    DEBUG["on"] = debug
    if not debug:
        previous = warnings.showwarning
        warnings.showwarning = _warning_line
        click.get_current_context().call_on_close(lambda: setattr(warnings, "showwarning", previous))


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning (e.g. bad samples skipped) as one `warning: ...` line on stderr; --debug keeps Python's format."""
    click.echo(f"warning: {message}", err=True)


def _missing_dependency(name: str, error: ImportError) -> click.Command:
    def refuse():
        raise click.ClickException(f"{name} needs {error.name or 'a missing package'} ({error}); pip install torch "
                                   "and ghost-deploy with its dependencies")

    return click.Command(name, callback=refuse, help=f"(unavailable here: {error.name} is not installed)",
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


if __name__ == "__main__":
    main()
