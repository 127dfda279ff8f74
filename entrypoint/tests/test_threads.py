"""The supervisor's threads carry their names into the kernel (top -H, /proc/<pid>/task/*/comm)."""

from __future__ import annotations

import threading
from pathlib import Path

from egress_proxy.threads import kernel_name, named_thread


def test_a_named_thread_shows_its_name_in_proc_cut_to_15_bytes() -> None:
    seen: list[str] = []

    def report(extra: str) -> None:
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip() + extra)

    thread = named_thread(report, "relay-access-accept", args=("!",))
    assert thread.daemon and thread.name == "relay-access-accept"
    thread.start()
    thread.join()
    assert seen == ["relay-access-ac!"]
    assert kernel_name("stdout-writer") == "stdout-writer"
    assert kernel_name("é" * 8) == "é" * 7  # never half a character
