"""User-facing errors and the one error boundary every command line runs inside.

Bad input (a config value, a file, a run directory) is reported as one line,
`error: <field or file>: <what is wrong>`, with exit code 1, never a traceback.
Programming errors (anything else) keep their traceback. `LM_TRACEBACK=1` re-raises
everything, for debugging.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(ValueError):
    """A config field (or a study axis) holds a value that cannot run: 'field: why'."""


# What bad input raises: our own checks raise ValueError / FileNotFoundError with the
# field or file first; OSError from the system names the file in `filename`.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, ImportError)


def one_line(exc: BaseException) -> str:
    """The exception as one line; OSErrors get their file name in front."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc)
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {exc.strerror or text}"
    elif isinstance(exc, UnicodeDecodeError):
        text = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    text = " ".join(text.split())
    return text or type(exc).__name__


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def boundary(*extra: type[BaseException]) -> Callable[[F], F]:
    """Decorator for a command line's main: user errors become one line and exit 1."""
    caught = USER_ERRORS + extra

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except caught as e:
                if os.environ.get("LM_TRACEBACK") == "1":
                    raise
                fail(one_line(e))
            return None

        return run  # type: ignore[return-value]

    return wrap


def config_load_error(e: BaseException) -> str:
    """ml_collections' multi-line load errors -> the line that says what is wrong."""
    while e.__cause__ is not None and isinstance(e, OSError):
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).replace("\\n", "\n").splitlines() if ln.strip()]
    errno = [ln for ln in lines if ln.startswith("[Errno")]
    if errno:
        return errno[0].split("] ", 1)[-1]
    text = " ".join(lines).replace("\\", "").replace("'", "")
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: {e.msg}"
    return f"{type(e).__name__}: {text}" if isinstance(e, NameError | ImportError) else text
