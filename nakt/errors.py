"""The one error type nakt raises for bad input: it names the file, the problem and, when known, the fix."""

from __future__ import annotations

import difflib
from pathlib import Path

__all__ = ["NaktError", "look_up_option"]


class NaktError(Exception):
    """Bad input that the user can fix. The CLI prints it as one line and exits with status 2.

    >>> str(NaktError("runs/a/config.json", 'missing key "spec"', "written by nakt train?"))
    'runs/a/config.json: missing key "spec" (written by nakt train?)'
    """

    def __init__(self, path: str | Path | None, problem: str, hint: str | None = None):
        self.path, self.problem, self.hint = path, problem, hint
        text = f"{path}: {problem}" if path is not None else problem
        super().__init__(f"{text} ({hint})" if hint else text)


def look_up_option(value: str, options, what: str = "option") -> str:
    """Return `value` if it is one of `options`, else raise with the valid values and the closest match.

    >>> look_up_option("mean", ["mean", "vote"])
    'mean'
    """
    options = list(options)
    if value in options:
        return value
    close = difflib.get_close_matches(value, options, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise NaktError(None, f"unknown {what} {value!r}", f"{hint}valid: {', '.join(map(str, options))}")
