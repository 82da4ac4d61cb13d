"""The one convention for user errors across the command-line tools.

A mistake in a config, a flag, a data file or a checkpoint raises `UserError` (a
`ValueError`, so library callers can catch it as one) with a message that names the file,
field or shape and says what to do. A command's entry point runs inside `cli(tool)`, which
prints such an error as one line, `<tool>: error: <message>`, and exits with status 2;
anything else is a bug in dico-jax and keeps its traceback. Setting
DICO_JAX_TRACEBACK=1 shows the traceback of user errors too.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

TRACEBACK_ENV = "DICO_JAX_TRACEBACK"
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake the user can fix: bad config, flag, file or data."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named (or a run needs) does not exist."""


class NotAFolder(UserError, NotADirectoryError):
    """A file was named where a folder is needed."""


class StorageUnavailable(UserError):
    """The storage of the workdir (a Cloud Storage bucket) stopped answering."""


def show_tracebacks() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def one_line(tool: str, err: BaseException) -> str:
    message = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
    return f"{tool}: error: {message}"


@contextlib.contextmanager
def cli(tool: str, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turns a `UserError` raised inside (or one of `also`: e.g. OSError where every file the
    command opens is one the user named) into one line on stderr and exit status 2."""
    try:
        yield
    except (UserError, *also) as err:
        if show_tracebacks():
            raise
        sys.stdout.flush()
        line = one_line(tool, err)
        print(line, file=sys.stderr, flush=True)
        runtime = sys.modules.get("dico_jax.runtime")
        if runtime is not None and runtime._WATCH is not None:
            # Several processes: the others learn of it and stop.
            runtime.report_failure(line)
        if _running_as_command():
            # Leave at once: the interpreter's shutdown would wait for the other processes,
            # and background threads (Orbax's) could print over the message as they stop.
            sys.stderr.flush()
            os._exit(EXIT_USER_ERROR)
        raise SystemExit(EXIT_USER_ERROR) from None


def _running_as_command() -> bool:
    """True in a `python -m dico_jax...` process (not when a test calls a command's main)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.startswith("dico_jax.")
