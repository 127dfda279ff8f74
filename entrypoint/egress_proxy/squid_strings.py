"""Squid 5.7's own strings, in one place beside the template: what it logs, its command-line flags, its cache
manager URLs and its result and error codes. Everything else refers to these names, so an upgrade of Squid that
changes a string is one edit here (and the integration suite says which).

Pure constants: no I/O, no imports from the package.
"""

from __future__ import annotations

# --- command line -----------------------------------------------------------------------------------------
# Foreground, but with SMP (a master, a coordinator and the workers); -N would mean one process and no
# coordinator, and then every reconfigure closes the listening port for a moment.
FLAG_FOREGROUND = "--foreground"
FLAG_SERVICE_NAME = "-n"
FLAG_CONFIG = "-f"
PARSE_ARGS = ("-k", "parse")
CERTGEN = "/usr/lib/squid/security_file_certgen"
IPC_DIR = "/var/run/squid"  # compiled into Debian's Squid: SMP mode's IPC sockets live here

# --- cache.log --------------------------------------------------------------------------------------------
# Each worker logs "Accepting HTTP Socket connections at ..." when it has (re)loaded its config.
ACCEPTING_MARKERS = ("Accepting", "connections at")
STARTING_MARKER = "Starting Squid Cache"
# `squid -k parse` output: lines with these words are errors.
PARSE_ERROR_MARKERS = ("FATAL", "ERROR", "Bungled")
# ... and so is any line saying that Squid dropped part of the config while parsing it: an ACL entry it ignores
# ("because of this '127.0.0.0/8' is ignored to keep splay tree searching predictable"; "WARNING: Ignoring ...",
# "... Ignored"), or an address whose mask it cut ("Netmask masks away part of the specified IP" turned
# ::ffff:127.0.0.24/128 into ::/0). A config that does not say what we rendered must never load.
PARSE_DROPPED_MARKERS = ("ignor", "masks away")


def is_parse_problem(line: str) -> bool:
    """True for a `squid -k parse` output line that makes the rendered config unusable."""
    return any(marker in line for marker in PARSE_ERROR_MARKERS) or any(
        marker in line.lower() for marker in PARSE_DROPPED_MARKERS)
PARSE_WARNING_MARKER = "WARNING"
# Deliberate: "via off" (an egress proxy should not announce itself to the destinations).
EXPECTED_PARSE_WARNINGS = ("HTTP requires the use of Via",)


# --- processes ---------------------------------------------------------------------------------------------
# In SMP mode the master execs each kid with argv[0] "(squid-N)" for worker N and "(squid-coord-M)" for the
# coordinator.
WORKER_ARGV0_PREFIX = "(squid-"


COORDINATOR_ARGV0_PREFIX = "(squid-coord-"


def coordinator_name(argv0: str) -> str | None:
    """``"(squid-coord-3)"`` -> ``"squid-coord-3"``; None for a worker or anything else."""
    if not argv0.startswith(COORDINATOR_ARGV0_PREFIX) or not argv0.endswith(")"):
        return None
    name = argv0[1:-1]
    return name if name[len("squid-coord-"):].isdigit() else None


def kid_worker_name(kid: int) -> str:
    """The name ``worker_name`` gives the worker whose kid number (Squid's ``${process_number}``) is ``kid``."""
    return f"squid-{kid}"


def worker_name(argv0: str) -> str | None:
    """``"(squid-2)"`` -> ``"squid-2"``; None for the coordinator or anything else."""
    if not argv0.startswith(WORKER_ARGV0_PREFIX) or not argv0.endswith(")"):
        return None
    name = argv0[1:-1]
    return name if name[len("squid-"):].isdigit() else None


def is_accepting(line: str) -> bool:
    return all(marker in line for marker in ACCEPTING_MARKERS)


# The access log's tcp: module (Log::TcpLogger) when its buffer overflows and when it takes lines again:
# "tcp:127.0.0.1:4321 logger starts dropping records." ... "tcp:127.0.0.1:4321 logger stops dropping records after
# 17 drops; current buffer use: ..."
TCP_LOGGER_STOPS_DROPPING = " logger stops dropping records after "


TCP_LOGGER_STARTS_DROPPING = " logger starts dropping records."
TCP_LOGGER_CLOSING = "Logfile: closing log tcp:"
TCP_LOGGER_OPENING = "Logfile: opening log tcp:"


class TcpLoggerDrops:
    """Each worker's drop episodes, from its cache.log lines. Squid reports an episode's count only when a later
    record fits again ("stops dropping records after N drops", Log::TcpLogger::canFit); a logger that is closed
    while it drops (a reconfigure or a stop closes every worker's logger; no record reaches it again) never says
    how many it lost, nor does a worker that dies mid-episode (seen when its revived successor opens its log).
    ``feed`` returns ("counted", N) for a reported count, ("uncounted", kid) when a kid's logger closes mid-episode
    or a kid opens its log while the previous one was still dropping, else None."""

    def __init__(self) -> None:
        self._dropping: set[str] = set()

    def feed(self, line: str) -> tuple[str, int | str] | None:
        kid = kid_of(line) or ""
        if (drops := tcp_logger_drops(line)) is not None:
            self._dropping.discard(kid)
            return "counted", drops
        if line.endswith(TCP_LOGGER_STARTS_DROPPING):
            self._dropping.add(kid)
        elif (TCP_LOGGER_CLOSING in line or TCP_LOGGER_OPENING in line) and kid in self._dropping:
            self._dropping.discard(kid)
            return "uncounted", kid
        return None


def tcp_logger_drops(line: str) -> int | None:
    """How many access lines a worker's tcp: logger dropped, from its "stops dropping records after N drops"
    cache.log line; None for any other line."""
    _, found, tail = line.partition(TCP_LOGGER_STOPS_DROPPING)
    count = tail.split(" ", 1)[0]
    return int(count) if found and count.isdigit() else None


FATAL_MARKERS = ("FATAL:", "assertion failed")


def is_fatal(line: str) -> bool:
    """A line a Squid process logs just before it dies of its own accord."""
    return any(marker in line for marker in FATAL_MARKERS)


def kid_of(line: str) -> str | None:
    """``"2026/11/27 10:00:00 kid1| ..."`` -> ``"kid1"`` (which SMP process logged it), else None."""
    head, sep, _ = line.partition("| ")
    last = head.rsplit(" ", 1)[-1]
    return last if sep and last.startswith("kid") and last[3:].isdigit() else None


def is_peer_connect_failure(line: str, host: str, port: int) -> bool:
    """Squid's cache.log note "TCP connection to HOST/PORT failed" (logged for every non-200 answer of a peer
    to a relayed CONNECT, e.g. each 403 of the refusal responder)."""
    return line.endswith(f"TCP connection to {host}/{port} failed")


def strip_timestamp(line: str) -> str:
    """``"2026/11/27 10:00:00| WARNING: ..."`` -> ``"WARNING: ..."``."""
    head, sep, tail = line.partition("| ")
    return tail if sep and head[:4].isdigit() else line


# --- cache manager ----------------------------------------------------------------------------------------
MANAGER_COUNTERS_PATH = "/squid-internal-mgr/counters"

# --- access log result codes (%Ss) and error codes (%err_code) ---------------------------------------------
STATUS_NONE = "NONE_NONE"  # the interim record of a CONNECT switching from peeking to splicing
STATUS_TUNNEL = "TCP_TUNNEL"
STATUS_DENIED = "TCP_DENIED"
ERR_CLIENT_GONE = "ERR_CLIENT_GONE"  # the client closed before sending a request
ERR_CONNECT_FAIL = "ERR_CONNECT_FAIL"
ERR_DNS_FAIL = "ERR_DNS_FAIL"
ERR_READ_TIMEOUT = "ERR_READ_TIMEOUT"
ERR_CONFLICT_HOST = "ERR_CONFLICT_HOST"  # 409 "Host header forgery": the name does not resolve to the original IP
ERR_PROTOCOL_UNKNOWN = "ERR_PROTOCOL_UNKNOWN"  # on_unsupported_protocol: not TLS inside a CONNECT
