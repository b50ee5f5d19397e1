"""The errors nrgpt raises on purpose, in one place.

``UserError`` and its subclasses are problems a user can fix: a bad setting, dataset, checkpoint or
run directory. Their message is one line saying what is wrong and how to fix it; the command line
prints it as ``nrgpt: error: ...`` and exits with status 2. ``DivergenceError`` is a training run
whose loss became non-finite (exit status 1, the last good checkpoint intact).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


class UserError(ValueError):
    """Bad input a user can fix; the message is one line: what is wrong and how to fix it."""


class ConfigError(UserError):
    """A configuration value or command-line option is invalid. The message names the field and what is allowed."""


class DataError(UserError):
    """Bad input to a data function (a dataset directory, a raw file, a prompt's symbols)."""


class CheckpointError(UserError):
    """A checkpoint or resume state cannot be read or does not fit; the message says what is wrong."""


class RunLockedError(UserError):
    """Another process holds the run directory."""


class DivergenceError(RuntimeError):
    """The loss or the gradient became non-finite; the message names the step and the last good checkpoint."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters: for one-line error messages."""
    return (str(e).strip().splitlines() or [""])[0][:limit]


def read_parsed(path: str | Path, parse: Callable[[str], Any], error: type[UserError], *, kind: str = "JSON",
                missing: str | None = None, fix: str = "") -> Any:
    """``parse`` of the UTF-8 text at ``path``, or ``error`` with one line: ``missing`` (default: "PATH does
    not exist") when there is no such file, "PATH is not valid KIND (why)" and then ": fix" when it does not
    parse."""
    try:
        return parse(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(missing or f"{path} does not exist") from None
    except ValueError as e:  # JSONDecodeError, TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path} is not valid {kind} ({first_line(e)})" + (f": {fix}" if fix else "")) from None
