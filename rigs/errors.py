"""The one exception hierarchy of twinstudio.

Library code raises these with structured fields (which file, which key, which
camera); only the CLI turns them into messages and exit codes.
"""

from __future__ import annotations

from pathlib import Path


#: exit codes of the ``twinstudio`` command (the README's table); each error class carries its own
EXIT_OK = 0
EXIT_ERROR = 1            # an unexpected error (a bug): the traceback is printed
EXIT_INPUT = 2            # unusable input or a refused request: bad file, session locked, corrupt journal, ...
EXIT_TAMPERED = 3         # verify: the bundle is not what was signed
EXIT_CONSENT = 4          # no consent in force covers what was asked (expired, revoked, scope, subject)
EXIT_UNTRUSTED = 5        # verify: intact, but signed by a key that is not trusted
EXIT_REVOCATION = 6       # verify: intact and trusted, but the revocation status is unknown or stale
EXIT_STAGE_FAILED = 7     # a stage that was asked for produced nothing (the report says why)
EXIT_INTERRUPTED = 130    # Ctrl-C


class TwinstudioError(Exception):
    """Base of every error twinstudio raises on purpose."""

    #: exit code the CLI uses for this kind of error
    exit_code: int = 1

    def __init__(self, message: str, **facts: object) -> None:
        super().__init__(message)
        self.message = message
        self.facts = {k: v for k, v in facts.items() if v is not None}

    def __str__(self) -> str:  # the message already names the facts
        return self.message

    def __reduce__(self):
        # subclasses take their own keyword arguments: rebuild from the state, not by calling __init__
        # (errors cross process boundaries: a Ray task's error reaches the batch's driver pickled)
        return _rebuild_error, (type(self), self.message, self.__dict__)


def _rebuild_error(cls: type, message: str, state: dict) -> TwinstudioError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class RigError(TwinstudioError):
    """A rig file is invalid: names the file, the dotted key and the line."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        path: Path | str | None = None,
        key: str | None = None,
        line: int | None = None,
        camera: str | None = None,
        light: str | None = None,
    ) -> None:
        where = str(path) if path is not None else "<rig>"
        if line is not None:
            where += f":{line}"
        if key:
            where += f" [{key}]"
        super().__init__(f"{where}: {message}", path=path, key=key, line=line,
                         camera=camera, light=light)
        self.reason = message
        self.path = Path(path) if path is not None else None
        self.key = key
        self.line = line
        self.camera = camera
        self.light = light


class ShapeError(TwinstudioError):
    """An array argument has the wrong shape."""

    exit_code = 2

    def __init__(self, name: str, actual: tuple[int, ...], expected: str) -> None:
        super().__init__(f"{name} has shape {actual}, expected {expected}",
                         name=name, actual_shape=actual, expected_shape=expected)
        self.name = name
        self.actual_shape = actual
        self.expected_shape = expected
