"""The ``retrogen`` command: the one composition root that assembles each package's subcommands.

It sits above every library (nothing imports it). Each package owns its commands (``index_builder.cli``,
``retrieval.cli``, ``generation.cli``, ``evaluation.cli``, ``service.cli``); their modules import only typer
and light modules at the top, so ``retrogen --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys

import click
import typer

from .demo import demo
from .errors import RetrogenError
from .evaluation.cli import evaluate
from .generation.cli import generate
from .index_builder.cli import app as index_app
from .retrieval.cli import retrieve, text_filter
from .service.cli import db_app, serve, worker

app = typer.Typer(
    no_args_is_help=True, add_completion=False,
    help="Augment a labelled image dataset by retrieval (CLIP + FAISS) or generation (Stable Diffusion), with provenance.",
)
augment_app = typer.Typer(no_args_is_help=True, help="Augment a labelled ImageFolder dataset.")
app.add_typer(augment_app, name="augment")
app.add_typer(index_app, name="index")
app.add_typer(db_app, name="db")
augment_app.command("retrieve")(retrieve)
augment_app.command("filter")(text_filter)
augment_app.command("generate")(generate)
for name, command in (("evaluate", evaluate), ("serve", serve), ("worker", worker), ("demo", demo)):
    app.command(name)(command)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # faiss logs which SIMD build it tried at INFO; nobody needs that by default
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def main() -> None:
    """Console entry point: any RetrogenError becomes one readable line and its exit code."""
    try:
        code = app(standalone_mode=False)  # returns a typer.Exit's code (``--help``: 0), else the command's None
    except RetrogenError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(e.exit_code)
    except click.ClickException as e:  # usage errors
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
