"""Exit codes of ``egress-proxy`` and the one place that maps an error to its code.

Each error class of the package carries its code as ``exit_code``; ``exit_code_of`` is the single mapping the
CLI and the supervisor use, so a code cannot mean two things in two places. docs/operations.md lists them.
Commands raise these errors (``UsageError`` for a command-line input they cannot use) and ``cli.main`` prints
each once, with ``print_error``.
"""

from __future__ import annotations

import sys
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNHEALTHY = 1  # `health` only: the proxy is not serving
    BAD_CONFIG = 2  # bad settings, a missing allowlist source setting, or a bad allowlist
    SQUID_FAILED = 3  # Squid failed to start or to parse the config
    NO_SOURCE = 4  # no allowlist source reachable at startup
    SQUID_DIED = 5  # Squid exited unexpectedly
    STARTUP_IO = 6  # the host refused a local resource at startup (state dir not writable, no free port...)


class UsageError(ValueError):
    """A command-line input a command cannot use: a bad flag value, an unreadable input file."""

    exit_code = ExitCode.BAD_CONFIG


def print_error(message: str) -> None:
    """The commands' one error line on stderr (``run`` writes JSON lines instead)."""
    print(f"egress-proxy: error: {message}", file=sys.stderr)


def exit_code_of(error: BaseException) -> ExitCode | None:
    """The exit code an error means, or None for an unexpected error (a bug: let it show its traceback)."""
    code = getattr(error, "exit_code", None)
    if isinstance(code, ExitCode):
        return code
    if isinstance(error, OSError):
        return ExitCode.STARTUP_IO
    return None


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: what failed on which path, without a traceback."""
    what = error.strerror or str(error)
    path = f" {error.filename}" if error.filename else ""
    return f"{what}:{path}".rstrip(":") if path else what
