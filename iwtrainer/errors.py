"""Error text for users: one line, whatever the exception (transformers/hub/sqlalchemy messages span several)."""

from __future__ import annotations

import argparse


def one_line(exc: BaseException | str) -> str:
    """An exception message on a single line (a ``KeyError``'s key without its quotes)."""
    text = str(exc) if not isinstance(exc, KeyError) or not exc.args else str(exc.args[0])
    return " ".join(text.split()) or type(exc).__name__


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser.error`` print ``prog: error: message`` on one line and exit 2 (argparse prints its whole usage
    block first, which buries the line that names the flag)."""

    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {one_line(message)}\n")

    parser.error = error
    return parser
