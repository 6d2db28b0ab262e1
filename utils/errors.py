"""One error type for everything a user can fix, printed by the command-line tools as one line.

Every problem with the user's input or folders (a malformed ``anns.pt``, an unreadable image, a
features folder made with other settings, a model that is not cached offline, ...) is raised as a
:class:`SoIRError` whose message names the file, the problem and the fix. The CLIs wrap their
``main`` in :func:`exit_on_error`, which prints ``error: <message>`` and exits with status 1, so a
user never has to read a library traceback to learn what to change. Anything else that goes wrong
is a bug in SoIR and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class SoIRError(ValueError):
    """Bad input or state that the user can fix; the message says what and how.

    A ``ValueError`` subclass, so code that handled the earlier ``ValueError`` still works.
    """


def exit_on_error(main: F) -> F:
    """Decorator for CLI entry points: a :class:`SoIRError` becomes one ``error: ...`` line on
    stderr and exit status 1; the run's log files (Hydra's ``<job>.log``) get it too. So does an
    ``OSError`` of :data:`WRITE_ERRORS` (disk full, file-size limit, no permission), naming the file."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SoIRError as err:
            _fail(str(err))
        except OSError as err:
            if err.errno not in WRITE_ERRORS:
                raise
            # The user's to fix (a full disk, a file-size limit, a read-only folder); every file SoIR
            # writes is atomic, so what was written before stays complete and a rerun resumes.
            _fail(
                f"cannot write {err.filename or 'a file'}: {err.strerror} ({errno.errorcode[err.errno]}); "
                f"{WRITE_ERRORS[err.errno]}, then rerun the same command (finished work is kept)"
            )

    return wrapper  # type: ignore[return-value]


_SPACE = "free disk space (or raise the file-size limit, ulimit -f)"
_ACCESS = "choose a folder you can write to (or fix its permissions)"
WRITE_ERRORS = {
    errno.ENOSPC: _SPACE,
    errno.EDQUOT: _SPACE,
    errno.EFBIG: _SPACE,
    errno.EACCES: _ACCESS,
    errno.EPERM: _ACCESS,
    errno.EROFS: _ACCESS,
}


def _fail(message: str) -> None:
    _log_to_files(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def _log_to_files(message: str) -> None:
    """Write ``message`` as an ERROR record to the file handlers only (the console gets the one
    ``error:`` line, not a second copy from the logging console handler)."""
    record = logging.LogRecord("soir", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
