"""What counts as the user's error, and what as a bug.

A `UserError` is a problem the user can fix (a bad config, a missing file, a malformed row in
strict mode, adapters that cannot be fused exactly, a model whose tokenizer does not fit): the
CLI prints its message as one line, `error: <file>[:line]: <field>: <problem>`, and exits with
status 2. A full disk or a permission problem while writing is reported the same way (the
finished artifacts are kept, and the same command resumes). Anything else is a bug in
fashionfuse or a library: the CLI lets it propagate with its traceback (exit status 1), so a
shape mismatch or an out-of-memory never looks like a config typo.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem the user can fix; its message names the file, line or config field."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the config points to does not exist."""


# OSError codes that mean "the machine, not fashionfuse": reported in one line, resumable
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def environment_problem(exc: BaseException) -> str | None:
    """One line for an OSError caused by the environment (disk full, no permission), else None."""
    if not isinstance(exc, OSError) or exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = exc.filename or "a file of the run"
    return (f"{where}: {exc.strerror or errno.errorcode.get(exc.errno, exc.errno)}: finished "
            "artifacts are kept; fix it (free space, permissions) and run the same command again")
