"""Squid external ACL helper: is the TLS ClientHello's SNI one valid host name that the client's policy allows?

Squid runs this file (copied into the state dir) as ``python3 -I sni_helper.py POLICY_DIR`` and hands it, at
``ssl_bump`` step 2, the raw ClientHello that it peeked at (``%>handshake``: the client's TLS records, base64,
URL-quoted) and the name of the policy that judges the client. It answers, per request line
``<channel-id> <handshake> <policy>``:

- ``<id> OK`` when the ClientHello carries exactly one ``server_name`` extension holding exactly one
  ``host_name``, that name is a valid DNS host name (letters, digits, hyphens; not an IP address), it is not on
  the policy's deny list, and it is on its allow list;
- ``<id> ERR sni_verdict=missing|malformed|denied|not_allowlisted`` otherwise. Squid adds the ``sni_verdict``
  pair to the transaction's notes, and squid.conf.j2 turns it into the logged reason (or, in report mode, into
  the ``would_deny`` note).

Why parse the ClientHello here and not trust ``%ssl::>sni``: Squid reports one name (the first host_name of the
last SNI extension, cut at a NUL byte). A ClientHello with two extensions, two names in one list, or
``allowed.example\\x00.evil.example`` showed Squid an allowlisted name while a lenient server could route on the
other. RFC 6066 section 3 allows one name of each type, RFC 8446 section 4.2 forbids repeated extensions, and a
host name has no NUL; we refuse all of these as malformed.

Standard library only, and self-contained: it runs under any python3 as Squid's unprivileged user. One process
answers many lookups concurrently (``concurrency=`` in squid.conf); Squid restarts it on every reconfigure, so it
always reads the active lists. POLICY_DIR holds ``<policy>.allow`` and ``<policy>.deny`` for every policy, the
rendered, validated lists that Squid's dstdomain ACLs read too: ``example.com`` is that host, ``.example.com`` the
domain and every subdomain.
"""

from __future__ import annotations

import base64
import os
import re
import sys
import urllib.parse
from collections.abc import Iterable, Iterator

MISSING = "missing"
MALFORMED = "malformed"
DENIED = "denied"
NOT_ALLOWLISTED = "not_allowlisted"

_HANDSHAKE_RECORD = 22
_CLIENT_HELLO = 1
_SERVER_NAME_EXTENSION = 0
_HOST_NAME_TYPE = 0
# A ClientHello is at most 2^24 bytes by its own length field; real ones are under 2 KiB (or ~8 KiB with large
# post-quantum key shares). Anything much larger is not worth parsing.
_MAX_HELLO = 64 * 1024
_MAX_NAME_OCTETS = 253
# The allowlist grammar's host names (allowlist.py): LDH labels of 1-63 octets, no leading/trailing hyphen.
_LDH_NAME = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)


class Malformed(ValueError):
    """The ClientHello (or its SNI) is not what a well-behaved client sends."""


def client_hello(records: bytes) -> bytes:
    """The ClientHello handshake message body from the client's first TLS records (it may span several)."""
    fragments = bytearray()
    offset = 0
    while offset < len(records):
        if len(records) - offset < 5:
            raise Malformed("truncated TLS record header")
        content_type, major = records[offset], records[offset + 1]
        length = int.from_bytes(records[offset + 3 : offset + 5], "big")
        if content_type != _HANDSHAKE_RECORD or major != 3:
            raise Malformed("not a TLS handshake record")
        body = records[offset + 5 : offset + 5 + length]
        if len(body) != length:
            raise Malformed("truncated TLS record")
        fragments += body
        offset += 5 + length
        if len(fragments) >= 4:
            needed = 4 + int.from_bytes(fragments[1:4], "big")
            if len(fragments) >= needed:
                break
    if len(fragments) < 4 or fragments[0] != _CLIENT_HELLO:
        raise Malformed("not a ClientHello")
    length = int.from_bytes(fragments[1:4], "big")
    if length > _MAX_HELLO or len(fragments) < 4 + length:
        raise Malformed("truncated ClientHello")
    return bytes(fragments[4 : 4 + length])


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, count: int) -> bytes:
        if self.offset + count > len(self.data):
            raise Malformed("truncated ClientHello field")
        chunk = self.data[self.offset : self.offset + count]
        self.offset += count
        return chunk

    def number(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def vector(self, length_width: int) -> bytes:
        return self.take(self.number(length_width))

    @property
    def done(self) -> bool:
        return self.offset == len(self.data)


def server_names(hello: bytes) -> list[bytes]:
    """Every host_name in the ClientHello, raw, after checking the extension block's structure. An empty list
    means no SNI extension at all. Raises Malformed for a repeated extension or a name list that is not exactly
    one host_name."""
    reader = _Reader(hello)
    reader.take(2 + 32)  # legacy_version, random
    reader.vector(1)  # legacy_session_id
    reader.vector(2)  # cipher_suites
    reader.vector(1)  # legacy_compression_methods
    if reader.done:
        return []  # a ClientHello without extensions (TLS 1.0 style): no SNI
    extensions = _Reader(reader.vector(2))
    if not reader.done:
        raise Malformed("bytes after the extensions block")
    seen: set[int] = set()
    names: list[bytes] = []
    while not extensions.done:
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind in seen:
            raise Malformed(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == _SERVER_NAME_EXTENSION:
            names = _server_name_list(data)
    return names


def _server_name_list(data: bytes) -> list[bytes]:
    outer = _Reader(data)
    entries = _Reader(outer.vector(2))
    if not outer.done:
        raise Malformed("bytes after the server_name list")
    names: list[bytes] = []
    while not entries.done:
        name_type = entries.number(1)
        name = entries.vector(2)
        if name_type != _HOST_NAME_TYPE:
            raise Malformed(f"server_name of unknown type {name_type}")
        names.append(name)
    if len(names) != 1:
        raise Malformed(f"{len(names)} host names in server_name (exactly one is allowed)")
    return names


def host_name(raw: bytes) -> str:
    """The SNI as a lower-case host name, or Malformed: no NUL or other control bytes, no IP address, LDH
    labels of at most 63 octets, at most 253 octets in all (one trailing dot is tolerated)."""
    try:
        name = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise Malformed("non-ASCII bytes in the host name") from None
    if name.endswith("."):
        name = name[:-1]
    if len(name) > _MAX_NAME_OCTETS or not _LDH_NAME.fullmatch(name):
        raise Malformed("not a valid DNS host name")
    if name.rsplit(".", 1)[-1].isdigit():
        raise Malformed("an IP address, not a host name")
    return name


def load_allowlist(lines: Iterable[str]) -> frozenset[str]:
    return frozenset(line.strip() for line in lines if line.strip())


def name_and_parents(name: str) -> Iterator[str]:
    """'a.b.c' -> 'a.b.c', 'b.c', 'c' (slices, so no re-joining of labels). The allowlist grammar's one suffix
    walk: allowlist.py matches with it too, so the helper and the policy cannot disagree on what a '.domain'
    entry covers (entrypoint/tests/test_sni_helper.py holds the two matches equal)."""
    start = 0
    while True:
        yield name[start:]
        dot = name.find(".", start)
        if dot < 0:
            return
        start = dot + 1


def allowlisted(name: str, allowed: frozenset[str]) -> bool:
    """``name`` is an exact entry, or it or a parent is a '.domain' entry. Whole labels only: 'evilexample.com'
    never matches '.example.com'."""
    return name in allowed or any("." + suffix in allowed for suffix in name_and_parents(name))


def verdict(handshake: str, allowed: frozenset[str], denied: frozenset[str] = frozenset()) -> str | None:
    """None when the SNI passes; otherwise MISSING, MALFORMED, DENIED or NOT_ALLOWLISTED. ``handshake`` is
    Squid's ``%>handshake`` value as it arrives on the helper's stdin."""
    if handshake in {"", "-"}:
        return MISSING
    try:
        records = base64.b64decode(urllib.parse.unquote(handshake), validate=True)
        names = server_names(client_hello(records))
        if not names:
            return MISSING
        name = host_name(names[0])
    except (Malformed, ValueError):  # binascii.Error, and b64decode's ValueError for a non-ASCII string
        return MALFORMED
    if allowlisted(name, denied):
        return DENIED
    return None if allowlisted(name, allowed) else NOT_ALLOWLISTED


Lists = dict[str, tuple[frozenset[str], frozenset[str]]]


def load_policies(directory: str) -> Lists:
    """Every policy's (allow, deny) lists from POLICY_DIR's ``<name>.allow`` and ``<name>.deny`` files."""
    lists: dict[str, dict[str, frozenset[str]]] = {}
    for filename in sorted(os.listdir(directory)):
        name, _, kind = filename.rpartition(".")
        if kind in {"allow", "deny"}:
            with open(os.path.join(directory, filename), encoding="utf-8") as handle:
                lists.setdefault(name, {})[kind] = load_allowlist(handle)
    empty: frozenset[str] = frozenset()
    return {name: (kinds.get("allow", empty), kinds.get("deny", empty)) for name, kinds in lists.items()}


def answer(line: str, policies: Lists) -> str:
    channel, handshake, policy = (line.split() + ["", "", ""])[:3]
    allowed, denied = policies.get(policy, (frozenset(), frozenset()))
    result = verdict(handshake, allowed, denied)
    return f"{channel} OK" if result is None else f"{channel} ERR sni_verdict={result}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: sni_helper.py POLICY_DIR", file=sys.stderr)
        return 2
    policies = load_policies(argv[1])
    for line in sys.stdin:
        sys.stdout.write(answer(line, policies) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
