"""The one exception type for mistakes a user can fix (bad input, bad config, bad folder)."""


class UserError(Exception):
    """A problem in what the user gave us. The CLI prints its message as one line and exits with ``exit_code``."""

    exit_code = 2
    every_process = False  # raised by one process of a launch: that process says it (llmtrain.cli._entry.fail)


class AgreedError(UserError):
    """A refusal every process of a launch reaches alike (the main process decided it and shared it, or the launch
    itself is wrong): only the main process says it, the others end quietly with the same code."""

    every_process = True


class RunDiverged(UserError):
    """Training stopped because its loss stayed non-finite: exit code 3, so a script can tell it from bad input."""

    exit_code = 3


def os_reason(exc: OSError) -> str:
    """Why a folder could not be made or written, in words: ``read-only file system: /mnt/ro``.

    ``Path.mkdir(parents=True)`` reports a file standing where a folder must go as "File exists"; say so plainly.
    """
    if isinstance(exc, FileExistsError) and exc.filename:
        return f"{exc.filename} is a file, not a folder"
    reason = (exc.strerror or str(exc)).lower()
    return f"{reason}: {exc.filename}" if exc.filename else reason
