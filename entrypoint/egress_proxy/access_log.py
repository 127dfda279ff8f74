"""The access log: one Squid logformat and its JSON reading, defined once so they cannot drift apart.

Squid writes one tab-separated line per transaction (user-controlled values URL-escaped); the supervisor turns
each into one JSON object with stable field names: the canonical decision log line.
"""

from __future__ import annotations

import json
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import squid_strings as strings

# Reason codes. "allowed" is the only allowing one; every other reason is a denial.
# Keep this tuple in sync with the README's table; the template generates one annotate ACL per entry.
REASONS: dict[str, str] = {
    "allowed": "the destination is on the allowlist",
    "client_not_allowed": "the client address is outside EGRESS_CLIENT_CIDRS",
    "port_not_allowed": "the destination port is not in EGRESS_ALLOWED_PORTS for this kind of request",
    "ip_literal": "the destination is an IP address; only allowlisted names are reachable",
    "invalid_host": "the host is not an ASCII host name (raw Unicode, a percent escape or another character no "
    "DNS name has, a label over 63 characters or a name over 253); send an internationalised name in its punycode "
    "(xn--) form",
    "domain_not_allowlisted": "the host is not on the allowlist",
    "domain_denied": "the host (or the TLS SNI) is on the policy's deny list",
    "destination_not_public": "the host resolves to a private, loopback, link-local or metadata address",
    "sni_missing": "the TLS ClientHello carried no SNI, so the real destination cannot be checked",
    "sni_not_allowlisted": "the TLS SNI names a host that is not on the allowlist (domain fronting)",
    "sni_malformed": "the TLS ClientHello's SNI is malformed: more than one name or extension, or not a valid "
    "host name (NUL or control bytes, an IP address, an over-long label)",
    "sni_unchecked": "the SNI check did not finish (its helper failed, or a reload cut it short), so the tunnel "
                     "was refused",
    "not_tls": "the CONNECT tunnel did not start with a TLS ClientHello",
    "manager_denied": "the cache manager is reachable from the proxy host only",
    "upstream_unavailable": "the upstream proxy (EGRESS_UPSTREAM_PROXY) is not accepting connections",
    "log_unavailable": "the proxy cannot write its log lines now (stdout stalled) and EGRESS_LOG_FULL=refuse says "
    "no log, no traffic",
    "host_header_forgery": "an intercepted connection's Host header or TLS SNI does not resolve to the IP address "
    "the client connected to (transparent mode), or an explicit request's Host header names another host than "
    "its URL",
    "forward_failed": "allowed, but the proxy could not complete the request: the destination (or the upstream "
    "proxy) could not be reached or did not answer, or Squid itself would not forward it (a forwarding loop: the "
    "request already carried this proxy's Via); the line's error field says how",
    "denied": "no rule allowed the request",
}


def _text(raw: str) -> str | None:
    if raw == "-" or not raw:
        return None
    return urllib.parse.unquote(raw) if "%" in raw else raw  # most values carry no escape: skip the call


def _int(raw: str) -> int | None:
    try:
        return int(raw)
    except ValueError:
        return None


def _float(raw: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        return None


@dataclass(frozen=True)
class Field:
    name: str
    code: str  # the Squid logformat code
    convert: Callable[[str], Any]


# '#' before a code asks Squid to URL-escape it, so a hostile value can never inject a tab or a newline.
FIELDS: tuple[Field, ...] = (
    Field("time", "%ts.%03tu", _float),
    Field("client_ip", "%>a", _text),
    Field("client_port", "%>p", _int),
    Field("method", "%#rm", _text),
    Field("host", "%#>rd", _text),
    Field("port", "%>rP", _int),
    Field("sni", "%#ssl::>sni", _text),
    Field("status", "%>Hs", _int),
    Field("reason", "%#{reason}note", _text),
    Field("policy", "%#{policy}note", _text),
    Field("client_identity", "%#{client_identity}note", _text),
    Field("would_deny", "%#{would_deny}note", _text),
    Field("mode", "%#{mode}note", _text),
    Field("squid_status", "%Ss", _text),
    Field("error", "%err_code", _text),
    Field("server_ip", "%<a", _text),
    Field("bytes_in", "%>st", _int),
    Field("bytes_out", "%<st", _int),
    Field("duration_ms", "%tr", _int),
)

SQUID_LOGFORMAT = "\t".join(field.code for field in FIELDS)
# (name, convert) per field, for parse_line: the supervisor parses every access line, and reading two attributes of
# each Field for each of its 19 values was a fifth of the parse.
_CONVERTERS: tuple[tuple[str, Callable[[str], Any]], ...] = tuple((field.name, field.convert) for field in FIELDS)


def tagged_logformat(token: str) -> str:
    """The logformat Squid is given: every line starts with the supervisor's per-start secret ``token``, a dash,
    the writing worker's kid number (Squid substitutes its ``${process_number}`` macro as each process reads
    squid.conf) and a tab, then ``SQUID_LOGFORMAT``. The access-log listener relays only lines that carry the
    token (see squid_process.AccessLogListener) and strips the tag; ``parse_line`` never sees it."""
    return f"{token}-${{process_number}}\t{SQUID_LOGFORMAT}"


def parse_line(line: str) -> dict[str, Any]:
    """One Squid log line -> the JSON-ready record (adds 'type' and 'decision')."""
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != len(FIELDS):
        return {"type": "access", "unparsed": line.rstrip("\r\n")}
    record: dict[str, Any] = {"type": "access"}
    for (name, convert), raw in zip(_CONVERTERS, parts, strict=True):
        record[name] = convert(raw)
    # Transparent mode notes "intercept" on lines from its intercept ports; everything else came to the proxy port.
    record["mode"] = record.get("mode") or "explicit"
    record["decision"] = decide(record)
    client_view(record)
    forward_outcome(record)
    return record


def decide(record: dict[str, Any]) -> str:
    """'allowed', 'would_deny' or 'denied'. A report-mode policy lets a request through that enforce mode would
    refuse: Squid notes that reason as ``would_deny``, and the line carries it as ``reason``. A transaction
    without a reason note never passed http_access (e.g. a malformed request Squid rejected itself), so it
    counts as denied; its Squid error code says why."""
    reason = record.get("reason")
    would_deny = record.pop("would_deny", None)
    if reason == "allowed":
        if would_deny:
            record["reason"] = would_deny
            return "would_deny"
        return "allowed"
    # A refused CONNECT is relayed through the loopback refusal responder (denier.py); that is not a server the
    # client reached, so don't report its address.
    record["server_ip"] = None
    if reason is None and record.get("error") == strings.ERR_CONFLICT_HOST:
        # Squid's own 409 "Host header forgery": it answers before any ACL runs, so the line has no reason note.
        record["reason"] = "host_header_forgery"
    elif reason is None:
        record["reason"] = "invalid_request" if record.get("error") else "denied"
    if record.get("method") == "CONNECT" and record.get("squid_status") == strings.STATUS_TUNNEL:
        # Squid "tunnelled" the refused CONNECT to the refusal responder, whose 403 the client got: say so.
        record["squid_status"] = strings.STATUS_DENIED
    return "denied"


def client_view(record: dict[str, Any]) -> None:
    """Make ``status`` what the client saw for an allowed CONNECT.

    On this ssl-bump port Squid answers every allowed CONNECT with ``200 Connection established`` before it
    connects anywhere (it needs the ClientHello first). ``%>Hs`` then holds what Squid would have answered,
    not what it sent: 500 for a tunnel that the origin (or Squid's idle timeout) closed first, though the
    client had a working tunnel and its data; 503 when the origin could not be reached, though the client got
    200 and then a closed connection. The client saw 200 in every case; an unreachable origin is named in
    ``error`` instead (Squid gives no error code there)."""
    if record.get("method") != "CONNECT" or record.get("decision") not in {"allowed", "would_deny"}:
        return  # (a report-mode policy's would_deny CONNECT went through like an allowed one)
    squid_status = record.get("status") or 0
    if squid_status >= 500 and record.get("squid_status") != strings.STATUS_TUNNEL and not record.get("error"):
        record["error"] = strings.ERR_CONNECT_FAIL
    record["status"] = 200


def forward_outcome(record: dict[str, Any]) -> None:
    """An allowed request that the proxy could not complete keeps ``decision: allowed`` (the policy allowed it)
    but gets ``reason: forward_failed``, so that nobody counting reasons reads a failure as a success: Squid's
    own error answer to a plain-HTTP request (a 5xx with an error code: the origin or the upstream proxy refused
    the connection, did not answer, or its name did not resolve; a 403 for a forwarding loop), or an allowed
    CONNECT whose origin was unreachable (``client_view`` names it ERR_CONNECT_FAIL). A client that went away is
    no failure of the proxy. A report-mode line keeps its would_deny reason, which is what that mode is for."""
    if record.get("decision") != "allowed" or record.get("reason") != "allowed":
        return
    error = record.get("error")
    if error is None or error == strings.ERR_CLIENT_GONE:
        return
    if record.get("method") == "CONNECT":
        failed = error == strings.ERR_CONNECT_FAIL
    else:
        # Squid's own error page (an error code) for a request the policy allowed: a 5xx, or a 403 for a
        # forwarding loop (a Via naming this proxy, which a client can send itself). An origin's own 4xx has no
        # error code.
        failed = (record.get("status") or 0) >= 400
    if failed:
        record["reason"] = "forward_failed"


def is_noise(record: dict[str, Any]) -> bool:
    """Records that would make the log lie or repeat itself:
    - a TCP connect-and-close with no request (the NLB's and our own health checks);
    - the interim record Squid writes when an allowed CONNECT switches from peeking to splicing: the tunnel's
      own TCP_TUNNEL record follows when it closes, with the bytes and the duration, and is the canonical one.
    A CONNECT refused at the SNI step has only the interim record, so that one is kept."""
    if record.get("method") is None and not record.get("bytes_in") and record.get("error") == strings.ERR_CLIENT_GONE:
        return True
    return (
        record.get("method") == "CONNECT"
        and record.get("squid_status") == strings.STATUS_NONE
        and record.get("decision") in {"allowed", "would_deny"}
        and record.get("status") == 200
        and record.get("error") is None  # an unreachable origin's CONNECT is its only record
    )


# CONNECTs after which Squid logs the connection's ClientHello bytes once more, as a record of its own: an allowed one
# whose origin was unreachable, and an intercepted TLS connection refused by the host forgery check (its 409).
FOLLOWED_UP_ERRORS = frozenset({strings.ERR_CONNECT_FAIL, strings.ERR_CONFLICT_HOST})


class ConnectionFollowUps:
    """Drops the record Squid adds after an allowed CONNECT whose origin was unreachable (or an intercepted one that
    failed the host forgery check): on the same client connection, with no method and no host, for the ClientHello
    bytes it had read. Counted as its own
    transaction it would be a second line for one connection, and a denial (no reason note) nobody made."""

    def __init__(self, remember: int = 4096) -> None:
        self._failed: OrderedDict[tuple[Any, Any], None] = OrderedDict()
        self._remember = remember

    def is_follow_up(self, record: dict[str, Any]) -> bool:
        key = (record.get("client_ip"), record.get("client_port"))
        if record.get("method") == "CONNECT" and record.get("error") in FOLLOWED_UP_ERRORS:
            self._failed[key] = None
            while len(self._failed) > self._remember:
                self._failed.popitem(last=False)
            return False
        if record.get("method") is None and record.get("host") is None and key in self._failed:
            del self._failed[key]
            return True
        return False


# One encoder for every line: json.dumps with any non-default argument builds a new JSONEncoder per call, which was
# a third of this function's time (the supervisor runs it for every access line).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def to_json(record: dict[str, Any]) -> str:
    return _ENCODER.encode(record)
