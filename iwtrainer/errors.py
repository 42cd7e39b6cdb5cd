"""Error text for users: one line, whatever the exception (transformers/hub/sqlalchemy messages span several)."""

from __future__ import annotations


def one_line(exc: BaseException | str) -> str:
    """An exception message on a single line (a ``KeyError``'s key without its quotes)."""
    text = str(exc) if not isinstance(exc, KeyError) or not exc.args else str(exc.args[0])
    return " ".join(text.split()) or type(exc).__name__
