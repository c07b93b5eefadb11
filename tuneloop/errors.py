"""User-facing errors. The CLI prints their message (no traceback) and exits non-zero."""


class TuneloopError(Exception):
    """A problem the user can fix: bad input, bad settings, missing prerequisite."""

    exit_code = 1


class ConfigError(TuneloopError):
    """The project settings are missing, malformed or name an unknown key."""

    exit_code = 2


class InputError(TuneloopError):
    """An input file is missing, unreadable, of an unsupported type or malformed."""

    exit_code = 2


class StateError(TuneloopError):
    """The project is not ready for the command (no documents, no champion, ...)."""

    exit_code = 3
