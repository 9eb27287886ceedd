"""The ``retrogen`` command: the one composition root that assembles each package's subcommands.

Each package owns its commands (``index_builder.cli``, ``retrieval.cli``, ``generation.cli``,
``service.cli``); their modules import only typer at the top, so ``retrogen --help`` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from .errors import RetrogenError

app = typer.Typer(
    no_args_is_help=True, add_completion=False,
    help="Augment a labelled image dataset by retrieval (CLIP + FAISS) or generation (Stable Diffusion), with provenance.",
)
augment_app = typer.Typer(no_args_is_help=True, help="Augment a labelled ImageFolder dataset.")
app.add_typer(augment_app, name="augment")

# (module, attribute, where, command name). A missing module (a package not built yet) is skipped.
_COMMANDS: list[tuple[str, str, str, str]] = [
    ("retrogen.index_builder.cli", "app", "root-group", "index"),
    ("retrogen.retrieval.cli", "retrieve", "augment", "retrieve"),
    ("retrogen.retrieval.cli", "text_filter", "augment", "filter"),
    ("retrogen.generation.cli", "generate", "augment", "generate"),
    ("retrogen.evaluation.cli", "evaluate", "root", "evaluate"),
    ("retrogen.service.cli", "serve", "root", "serve"),
    ("retrogen.service.cli", "worker", "root", "worker"),
    ("retrogen.demo", "demo", "root", "demo"),
]


def _register() -> None:
    for module, attr, where, name in _COMMANDS:
        try:
            obj = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue
            raise
        if where == "root-group":
            app.add_typer(obj, name=name)
        elif where == "augment":
            augment_app.command(name)(obj)
        else:
            app.command(name)(obj)


_register()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # faiss logs which SIMD build it tried at INFO; nobody needs that by default
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def main() -> None:
    """Console entry point: any RetrogenError becomes one readable line and its exit code."""
    try:
        app(standalone_mode=False)
    except RetrogenError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(e.exit_code)
    except FileExistsError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
