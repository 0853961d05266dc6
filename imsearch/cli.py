"""Command line root: the `imsearch` app and its groups; each floor attaches its own commands here."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from indexer import cli as indexer_cli
from service import cli as service_cli
from training import cli as training_cli

HELP = "Image search: scenes, dual encoder, index, rerank, serve."
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, help=HELP)
train = typer.Typer(no_args_is_help=True, help="Train the embedded models.")
evaluate = typer.Typer(no_args_is_help=True, help="Evaluate models on held-out scenes.")
index = typer.Typer(no_args_is_help=True, help="Build and mutate versioned FAISS indexes.")
app.add_typer(train, name="train")
app.add_typer(evaluate, name="eval")
app.add_typer(index, name="index")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        sys.stdout.write(f"imsearch {version('imsearch')}\n")
        raise typer.Exit()


@app.callback(help=HELP)
def root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="print the version and exit")] = False) -> None:
    """The options before any command."""


indexer_cli.register(index)
training_cli.register(app, train, evaluate)
service_cli.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
