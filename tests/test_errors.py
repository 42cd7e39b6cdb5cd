"""iwtrainer.errors.one_line: a user-facing error message on one line, whatever the exception."""

from __future__ import annotations

from iwtrainer.errors import one_line
from iwtrainer.glue import arguments


def test_one_line():
    assert one_line(ValueError("bad value\n  on two\tlines ")) == "bad value on two lines"
    assert one_line(KeyError("missing_key")) == "missing_key"  # without the quotes str(KeyError) adds
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError()) == "RuntimeError"  # an empty message names the exception
    assert one_line(OSError(2, "No such file")) == "[Errno 2] No such file"
    assert one_line("already\na string") == "already a string"
    assert arguments.one_line is one_line  # the GLUE script reports its errors through it
