"""Errors caused by the user's input (config, data, files, workdir) rather than by a bug.

`python -m consistency_jax.main` prints a UserError as one message, without a
traceback: the message says what was wrong and what is valid. Any other
exception is a bug and keeps its traceback.
"""

import os
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad input; the message alone tells the user what to change."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the run needs is not there; the message says where it was looked for and how to get it."""


class FileReadError(UserError, ValueError):
    """A file the run needs exists but cannot be read; the message names the file."""


def read_file(path: str, what: str, reader: Callable[[str], T], advice: str = "") -> T:
    """reader(path), with any failure to parse the file reported as FileReadError naming `what` and `path`.

    Errors that already name the path (the reader's own checks) pass through
    unchanged; everything else (a truncated archive, a file of another format,
    an unreadable file) becomes one message with the file, the error and `advice`.
    """
    try:
        return reader(path)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 -- an untrusted file can fail in any library's way
        if isinstance(error, ValueError) and path in str(error):
            raise
        size = os.path.getsize(path) if os.path.isfile(path) else None
        details = f"{type(error).__name__}: {error}".strip().rstrip(".")
        raise FileReadError(
            f"{what} {path}" + (f" ({size:,} bytes)" if size is not None else "")
            + f" cannot be read: {details}." + (f" {advice}" if advice else "")) from error
