"""The `ctxrestore` command: a thin typer layer over the functions in `ctxrestore.api`."""

from __future__ import annotations

import functools
import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

import ctxrestore
from ctxrestore import api
from ctxrestore.errors import CtxRestoreError
from ctxrestore.launcher import launched_rank
from ctxrestore.progress import show_progress

app = typer.Typer(
    name="ctxrestore",
    help="Self-supervised pretraining of medical-imaging CNNs by context restoration.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}
_errors = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctxrestore {ctxrestore.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[bool, typer.Option(help="Show full tracebacks of errors.")] = False,
    quiet: Annotated[
        bool, typer.Option(help="Only warnings and errors: no progress bars or progress lines.")
    ] = False,
) -> None:
    _state["debug"] = debug
    show_progress(not quiet)
    # Under torchrun the other ranks only warn: one copy of each line, from rank 0.
    other_rank = launched_rank() != 0
    logging.basicConfig(
        level=logging.WARNING if quiet or other_rank else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=_errors, show_path=False)],
        force=True,
    )


def _command(function):
    """Register an API function as is; the user's errors become one line and exit code 2."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            function(*args, **kwargs)
        except CtxRestoreError as error:
            if _state["debug"]:
                raise
            _errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return run


app.command("pretrain")(_command(api.pretrain))
app.command("finetune")(_command(api.finetune))
app.command("benchmark")(_command(api.benchmark))
app.command("ablate")(_command(api.ablate))
app.command("compare")(_command(api.compare))
app.command("probe")(_command(api.probe))
app.command("predict")(_command(api.predict))
app.command("demo")(_command(api.demo))
app.command("phantoms")(_command(api.phantoms))


def main() -> None:
    app()
