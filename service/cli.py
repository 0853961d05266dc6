"""Command line root: `imsearch` with every floor's subcommands (indexer, reranker, service)."""

from __future__ import annotations

from indexer.cli import app, eval_app, train_app
from reranker.cli import register

register(train_app, eval_app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
