"""The supervisor's threads, named for the kernel too, so ``top -H``, ``ps -L`` and /proc/<pid>/task/*/comm show
which of them uses the CPU (Python before 3.14 names its threads only for itself)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

COMM_BYTES = 15  # the kernel keeps 15 bytes of a thread's name (TASK_COMM_LEN 16, with the NUL)


def kernel_name(name: str) -> str:
    """``name`` as the kernel will show it: at most 15 bytes."""
    return name.encode("utf-8")[:COMM_BYTES].decode("utf-8", errors="ignore")


def name_this_thread(name: str) -> None:
    """Give the calling thread ``name`` in /proc (its comm). Best effort: where /proc is not writable, it keeps
    its inherited name, and nothing else changes."""
    with contextlib.suppress(OSError), open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
        comm.write(kernel_name(name))


def named_thread(target: Callable[..., object], name: str, args: tuple[object, ...] = ()) -> threading.Thread:
    """A daemon thread (not started) that runs ``target(*args)`` under ``name``, in Python and in the kernel."""

    def run() -> None:
        name_this_thread(name)
        target(*args)

    return threading.Thread(target=run, name=name, daemon=True)
