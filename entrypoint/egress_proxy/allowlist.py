"""The allowlist policy: grammar, normalisation, collapse and matching.

This module is deliberately pure: it turns text into an :class:`Allowlist`
(or an :class:`AllowlistError` describing *every* bad entry) and answers
"is this host allowed?".  It does no I/O so that the same code validates a
file at start-up, a Secrets Manager value on rotation and a CLI ``check``
run, and so that it is cheap to unit test exhaustively.

Grammar (from the product spec):

* ``example.com``  - exactly that host.
* ``.example.com`` - the domain *and* every subdomain (Squid ``dstdomain``
  semantics, so it also covers ``example.com`` itself).
* ``*.example.com`` - accepted as ``.example.com`` with a warning.
* Entries are separated by commas and/or any whitespace; ``#`` starts a
  comment that runs to the end of the line.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import NamedTuple

import idna
from publicsuffixlist import PublicSuffixList

from .errors import ExitCode
from .sni_helper import name_and_parents

__all__ = [
    "MAX_PROBLEMS_SHOWN",
    "MAX_VALUE_BYTES",
    "MAX_WARNINGS",
    "Allowlist",
    "AllowlistError",
    "AllowlistProblem",
    "parse_allowlist",
    "parse_allowlist_items",
    "parse_allowlist_value",
]

# Anything this large is a mistake (wrong file, binary blob), not a policy.
# 8 MiB still leaves room for ~250k realistic entries.
MAX_VALUE_BYTES = 1_048_576 * 8

# str(AllowlistError) lists at most this many problems so that one broken
# 100k-line file does not flood the logs; `.problems` always has them all.
MAX_PROBLEMS_SHOWN = 20

# Same reasoning for warnings: a list with 50k duplicates would otherwise log
# 50k lines on every reload.  The overflow is summarised in a final warning.
MAX_WARNINGS = 100

_MAX_NAME_OCTETS = 253  # RFC 1035 limit for a name without the root dot.
_MAX_LABEL_OCTETS = 63
_TRUNCATE_AT = 60  # how much of a whole secret value to quote in a problem.

_SEPARATORS = re.compile(r"[\s,]+")
# Letters, digits and hyphens only (RFC 952/1123 host names).  Underscores are
# REJECTED on purpose: they appear in DNS record names (`_dmarc`, SRV records)
# but never in names of hosts a client connects to through a proxy, and Squid's
# own host-name validation refuses them, so accepting them would only produce
# an entry that can never match.
_LDH_LABEL = re.compile(r"[a-z0-9-]+")
_LDH_LABEL_PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_LDH_NAME = re.compile(rf"(?:{_LDH_LABEL_PATTERN}\.)*{_LDH_LABEL_PATTERN}")
# The common entry, checked by one regex (see _plain_entry): an optional leading dot, then an LDH name of at least
# two labels, lower case.
_PLAIN_ENTRY = re.compile(rf"\.?((?:{_LDH_LABEL_PATTERN}\.)+{_LDH_LABEL_PATTERN})")

_IP_FIX = "list the host name instead; IP destinations are refused by design"
_JSON_FIX = (
    'use {"allowed_domains": ["example.com", ".example.org"]} '
    "or a comma-separated list such as 'example.com, .example.org'"
)


@dataclass(frozen=True)
class AllowlistProblem:
    """One invalid entry, with enough context to fix it without reading code."""

    entry: str  # the entry exactly as the user wrote it
    why: str  # what is wrong, phrased to follow the entry ("is an IP address")
    fix: str  # a concrete suggestion
    line: int | None = None  # 1-based line in the source text, when known
    # Where the problem is in a JSON policy document, e.g. 'policies[1].allow[3]'.
    # An empty `entry` with a path means the problem is about the item itself
    # (a missing key, say), not about a value written there.
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            subject = f"{self.entry!r} " if self.entry else ""
            return f"{self.path}: {subject}{self.why}; {self.fix}"
        where = f" (line {self.line})" if self.line is not None else ""
        return f"allowlist entry {self.entry!r}{where} {self.why}; {self.fix}"


class AllowlistError(ValueError):
    """The allowlist as a whole is rejected; `problems` lists every bad entry.

    Rejecting the whole update (rather than dropping bad entries) is the
    product rule: a half-applied allowlist is a silent policy change.
    """

    exit_code = ExitCode.BAD_CONFIG
    problems: tuple[AllowlistProblem, ...]
    source: str

    def __init__(
        self, problems: Iterable[AllowlistProblem], source: str = "allowlist"
    ) -> None:
        self.problems = tuple(problems)
        self.source = source
        super().__init__(self._render())

    def __reduce__(
        self,
    ) -> tuple[type[AllowlistError], tuple[tuple[AllowlistProblem, ...], str]]:
        # The default pickling would call AllowlistError(message) and lose the
        # structured problems; keep them (errors may cross process boundaries).
        return (type(self), (self.problems, self.source))

    def _render(self) -> str:
        count = len(self.problems)
        if count == 1:
            # "file: message" convention keeps a single problem on one line.
            return f"{self.source}: {self.problems[0]}"
        # A policy document's problems are not all entries (a bad CIDR, a
        # duplicate name): name them neutrally there.
        noun = (
            "problems"
            if any(problem.path is not None for problem in self.problems)
            else "invalid allowlist entries"
        )
        lines = [f"{count} {noun} in {self.source}:"]
        lines.extend(f"  {problem}" for problem in self.problems[:MAX_PROBLEMS_SHOWN])
        if count > MAX_PROBLEMS_SHOWN:
            lines.append(f"  ... and {count - MAX_PROBLEMS_SHOWN} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class Allowlist:
    """A validated, minimal, sorted allowlist.

    Build it with :func:`parse_allowlist` / :func:`parse_allowlist_value`;
    the constructor only checks the cheap structural invariants.  Equality
    and hashing consider the entries only (two lists that allow the same
    hosts are the same policy, whatever warnings produced them).
    """

    entries: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # For lists read from a policy document: the path each kept entry was
    # written at ('policies[0].deny[2]'), so later checks can point at it.
    paths: Mapping[str, str] = field(
        default_factory=dict, compare=False, repr=False
    )
    # Lookup sets derived from `entries`; precomputed so allows() is O(labels).
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _domains: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        entries = tuple(self.entries)
        if not all(a < b for a, b in pairwise(entries)):  # sorted and unique, in one pass
            raise ValueError(
                "Allowlist entries must be unique and sorted; use parse_allowlist()"
            )
        object.__setattr__(self, "entries", entries)
        object.__setattr__(self, "warnings", tuple(self.warnings))
        object.__setattr__(
            self, "_exact", frozenset(e for e in entries if not e.startswith("."))
        )
        object.__setattr__(
            self, "_domains", frozenset(e[1:] for e in entries if e.startswith("."))
        )

    def __len__(self) -> int:
        return len(self.entries)

    def allows(self, host: str) -> bool:
        """The policy decision for a host name.

        The host is normalised like entries (case, one trailing dot, IDN);
        anything that is not a valid host name - including every IP literal -
        is denied.
        """
        name = _normalise_host(host)
        if name is None:
            return False
        if name in self._exact:
            return True
        # Walk the host's own name and each parent: a '.example.com' entry is
        # stored as 'example.com' in _domains and matches any of them.  Because
        # we only ever compare whole labels, 'evilexample.com' can never match
        # '.example.com', and 'example.com.evil.net' only tries its own parents.
        for suffix in name_and_parents(name):
            if suffix in self._domains:
                return True
        return False

    def covers(self, entry: str) -> bool:
        """True if every host `entry` (a normalised entry, e.g. from another
        Allowlist) matches is allowed by this list."""
        if not entry.startswith("."):
            return self.allows(entry)
        return any(suffix in self._domains for suffix in name_and_parents(entry[1:]))

    def overlaps(self, entry: str) -> bool:
        """True if at least one host `entry` (a normalised entry) matches is
        allowed by this list."""
        if not entry.startswith("."):
            return self.allows(entry)
        name = entry[1:]
        # '.name' meets this list when a parent (or name itself) is allowed, or
        # when some entry lies at or under name.
        return self.allows(name) or name in self._entry_suffixes

    @functools.cached_property
    def _entry_suffixes(self) -> frozenset[str]:
        # Every entry name and each of its parents: built once, on first use,
        # so overlaps() stays O(labels) per call for large lists.
        return frozenset(
            suffix for entry in self.entries for suffix in name_and_parents(entry.lstrip("."))
        )

    def diff(self, newer: Allowlist) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(added, removed) entries going from `self` to `newer`, both sorted: each list's entries are sorted
        already, so filtering them keeps the order (a new 100,000-entry list: 0.02 s, against 0.1 s sorting the
        set differences, in every reload)."""
        old, new = set(self.entries), set(newer.entries)
        return (tuple(entry for entry in newer.entries if entry not in old),
                tuple(entry for entry in self.entries if entry not in new))


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


# _Token and _Entry are NamedTuples, not frozen dataclasses: a 100,000-entry list makes 100,000 of each on every
# validation, and a frozen dataclass sets each field through object.__setattr__ (0.09 s for the _Entry objects
# alone, against about a third of that).
class _Token(NamedTuple):
    raw: str  # as written, for messages
    line: int | None
    path: str | None = None  # the item's path in a policy document


class _Entry(NamedTuple):
    raw: str
    line: int | None
    name: str  # normalised A-label name, no leading/trailing dot
    subdomains: bool  # True for '.example.com' / '*.example.com'
    path: str | None = None


@dataclass(frozen=True)
class _Rejection:
    why: str
    fix: str


def parse_allowlist(text: str, *, source: str = "allowlist") -> Allowlist:
    """Parse the comma/whitespace/newline separated form.

    Raises AllowlistError listing every invalid entry.
    """
    _check_size(text, source)
    return _build(_tokenise(text), source)


def parse_allowlist_items(
    items: Iterable[object], *, path: str, source: str = "allowlist"
) -> Allowlist:
    """Parse an already decoded JSON list of entries, such as a policy's
    'allow' list; `path` (e.g. 'policies[0].allow') locates each item in
    problems and warnings ('policies[0].allow[3]').

    Raises AllowlistError listing every invalid item.  An empty list is valid
    and produces no warning: whether "nothing" is alarming depends on the
    list's role, which the caller knows.
    """
    key = path.rsplit(".", 1)[-1]
    tokens = [
        _json_item(item, path=f"{path}[{index}]", key=key)
        for index, item in enumerate(items)
    ]
    return _build(tokens, source, empty_warning=None)


# UTS 46's deviation characters: IDNA2008 keeps them, so 'straße.example' is 'xn--strae-oqa.example'; IDNA2003 and
# UTS 46's transitional processing (still used by some resolver libraries and clients, Python's own 'idna' codec
# among them) map them away and send 'strasse.example' for the same spelling. Both are real, distinct DNS names.
_DEVIATIONS = {"\u00df": "ss", "\u1e9e": "ss", "\u03c2": "\u03c3", "\u200c": "", "\u200d": ""}


def transitional_spelling(entry: str) -> str | None:
    """The name a transitional (IDNA2003) client sends for ``entry`` when that differs from the entry's own
    (IDNA2008) form, else None. ``entry`` as written in a list: Unicode or 'xn--' labels, with an optional '.'
    or '*.' prefix. Deny lists hold both forms, so a deny rule holds whichever mapping the client applies."""
    if not isinstance(entry, str) or entry.isascii() and "xn--" not in entry.lower():
        return None
    labels = []
    for label in entry.split("."):
        if label.lower().startswith("xn--"):
            try:
                label = idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                return None  # the parser names the bad label
        labels.append(label)
    unicode_form = ".".join(labels)
    mapped = unicode_form
    for deviation, replacement in _DEVIATIONS.items():
        mapped = mapped.replace(deviation, replacement)
    return mapped if mapped != unicode_form else None


def parse_allowlist_value(value: str, *, source: str) -> Allowlist:
    """Parse a Secrets Manager secret value.

    Either the plain form accepted by :func:`parse_allowlist`, or JSON
    ``{"allowed_domains": ["a.com", ".b.com"]}``.  A value starting with '{'
    is always treated as JSON, so a malformed JSON secret is reported as
    such instead of as a pile of confusing "invalid character" entries.
    """
    _check_size(value, source)
    stripped = value.strip()
    if stripped.startswith("{"):
        return _build(_json_items(stripped, source), source)
    if stripped.startswith("["):
        # A bare JSON list is a likely shape mistake; say so when it really is
        # JSON.  If it is not JSON (e.g. '[::1]') the plain parser explains it.
        try:
            decoded = json.loads(stripped)
        except ValueError:
            pass
        else:
            raise AllowlistError(
                [
                    _whole_value_problem(
                        stripped, f"is a JSON {_json_type(decoded)}, not an object"
                    )
                ],
                source,
            )
    return _build(_tokenise(value), source)


def _check_size(text: str, source: str) -> None:
    # len(text) <= bytes <= 4 * len(text): only encode when it could matter.
    if len(text) * 4 <= MAX_VALUE_BYTES:
        return
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_VALUE_BYTES:
        raise AllowlistError(
            [
                AllowlistProblem(
                    entry=_truncate(text),
                    why=f"is {size} bytes, over the {MAX_VALUE_BYTES}-byte (8 MiB) limit",
                    fix="this does not look like an allowlist; check the file or secret, "
                    "and use '.example.com' entries to cover whole domains instead of listing hosts",
                    line=None,
                )
            ],
            source,
        )


def _tokenise(text: str) -> Iterator[_Token]:
    # Split on '\n' only (not str.splitlines, which also splits on form feeds,
    # U+2028 etc.) so that line numbers match what editors show.
    for number, line in enumerate(text.split("\n"), start=1):
        content = line.split("#", 1)[0]
        for raw in _SEPARATORS.split(content):
            if raw:
                yield _Token(raw, number)


def _json_items(value: str, source: str) -> list[_Token | AllowlistProblem]:
    """Entries of the JSON form; items that are not usable strings come back
    as problems in place, so every problem is reported in input order."""
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError as exc:
        why = f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise AllowlistError([_whole_value_problem(value, why)], source) from None
    except ValueError as exc:  # e.g. lone surrogates
        raise AllowlistError(
            [_whole_value_problem(value, f"is not valid JSON: {exc}")], source
        ) from None

    if not isinstance(decoded, dict):
        raise AllowlistError(
            [
                _whole_value_problem(
                    value, f"is a JSON {_json_type(decoded)}, not an object"
                )
            ],
            source,
        )
    if "allowed_domains" not in decoded:
        raise AllowlistError(
            [_whole_value_problem(value, "has no 'allowed_domains' key")], source
        )
    unexpected = sorted(key for key in decoded if key != "allowed_domains")
    if unexpected:
        # Strict on purpose: a misspelt sibling key would otherwise be ignored
        # silently, and a security policy should not guess.
        keys = ", ".join(repr(key) for key in unexpected)
        raise AllowlistError(
            [_whole_value_problem(value, f"has unexpected keys {keys}")], source
        )
    domains = decoded["allowed_domains"]
    if not isinstance(domains, list):
        why = f"has 'allowed_domains' as a JSON {_json_type(domains)}, not a list"
        raise AllowlistError([_whole_value_problem(value, why)], source)

    return [_json_item(item, path=None, key="allowed_domains") for item in domains]


def _json_item(item: object, *, path: str | None, key: str) -> _Token | AllowlistProblem:
    """One entry of a JSON list, or the problem with it (`key` names the list
    in suggestions, `path` locates the item in a policy document)."""
    if not isinstance(item, str):
        return AllowlistProblem(
            entry=_truncate(json.dumps(item)),
            why=f"is a JSON {_json_type(item)}, not a string",
            fix='write each domain as a JSON string, e.g. "example.com"',
            line=None,
            path=path,
        )
    stripped = item.strip()
    if not stripped:
        return AllowlistProblem(
            entry=item,
            why="is an empty string",
            fix=f"remove it from '{key}'",
            line=None,
            path=path,
        )
    if _SEPARATORS.search(stripped):
        parts = ", ".join(
            json.dumps(part) for part in _SEPARATORS.split(stripped) if part
        )
        return AllowlistProblem(
            entry=item,
            why="holds several entries in one string",
            fix=f"in the JSON form list each domain as its own string: [{parts}]",
            line=None,
            path=path,
        )
    return _Token(stripped, None, path)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _whole_value_problem(value: str, why: str) -> AllowlistProblem:
    return AllowlistProblem(entry=_truncate(value), why=why, fix=_JSON_FIX, line=None)


def _truncate(value: str) -> str:
    value = value.strip()
    return value if len(value) <= _TRUNCATE_AT else value[:_TRUNCATE_AT] + "..."


_EMPTY_WARNING = "the allowlist is empty: every request will be denied"


def _build(
    tokens: Iterable[_Token | AllowlistProblem],
    source: str,
    *,
    empty_warning: str | None = _EMPTY_WARNING,
) -> Allowlist:
    problems: list[AllowlistProblem] = []
    warnings: list[str] = []
    accepted: list[_Entry] = []
    for token in tokens:
        if isinstance(token, AllowlistProblem):
            # Already diagnosed while reading (e.g. a JSON item of the wrong type).
            problems.append(token)
            continue
        result = _classify(token.raw)
        if isinstance(result, _Rejection):
            problems.append(
                AllowlistProblem(
                    token.raw, result.why, result.fix, token.line, token.path
                )
            )
            continue
        name, subdomains, was_star = result
        if was_star:
            warnings.append(
                f"{_located(token.raw, token.line, token.path)} was read as '.{name}' "
                f"(the domain and all its subdomains); write '.{name}' to silence this warning"
            )
        accepted.append(_Entry(token.raw, token.line, name, subdomains, token.path))
    if problems:
        raise AllowlistError(problems, source)

    entries, collapse_warnings, kept = _collapse(accepted)
    warnings.extend(collapse_warnings)
    if len(warnings) > MAX_WARNINGS:
        hidden = len(warnings) - MAX_WARNINGS
        warnings = warnings[:MAX_WARNINGS] + [f"... and {hidden} more warnings"]
    if not entries and empty_warning is not None:
        warnings.insert(0, empty_warning)
    paths = {
        rendered: entry.path for rendered, entry in kept.items() if entry.path is not None
    }
    return Allowlist(
        entries=tuple(sorted(entries)), warnings=tuple(warnings), paths=paths
    )


def _collapse(
    accepted: list[_Entry],
) -> tuple[list[str], list[str], dict[str, _Entry]]:
    """Drop duplicates and entries covered by a '.domain' entry.

    Returns the kept entries, the warnings, and the entry each kept one was
    first written as.

    Squid 5 refuses (or warns loudly about) dstdomain lists where one entry
    is a subdomain of another, so the rendered list must be minimal.  This is
    O(total labels): one set of '.domain' names, and each entry walks its own
    parent suffixes.
    """
    domains = {entry.name for entry in accepted if entry.subdomains}
    kept: list[str] = []
    warnings: list[str] = []
    first_seen: dict[str, _Entry] = {}  # rendered form -> first occurrence
    for entry in accepted:
        rendered = f".{entry.name}" if entry.subdomains else entry.name
        # Look for the *outermost* covering '.domain': it has no cover itself,
        # so it is certain to be kept and is the right thing to point at.
        # A '.domain' entry is covered by strict parents only; an exact host
        # is also covered by its own name ('.example.com' includes
        # 'example.com' in dstdomain semantics).
        covering = _outermost_cover(
            entry.name, domains, include_self=not entry.subdomains
        )
        if covering is not None:
            warnings.append(
                f"{_located(entry.raw, entry.line, entry.path)} is already covered by '.{covering}'; dropped"
            )
            continue
        first = first_seen.get(rendered)
        if first is not None:
            warnings.append(
                f"{_located(entry.raw, entry.line, entry.path)} duplicates "
                f"{_located(first.raw, first.line, first.path)}"
                f" (both mean '{rendered}'); dropped"
            )
            continue
        first_seen[rendered] = entry
        kept.append(rendered)
    return kept, warnings, first_seen


def _outermost_cover(name: str, domains: set[str], *, include_self: bool) -> str | None:
    """The shortest '.domain' (stored without its dot) covering `name`."""
    found = name if include_self and name in domains else None
    # Walk the parents by slicing at each dot; keep the last (shortest) hit.
    dot = name.find(".")
    while dot >= 0:
        suffix = name[dot + 1 :]
        if suffix in domains:
            found = suffix
        dot = name.find(".", dot + 1)
    return found


def _where(line: int | None) -> str:
    return f" (line {line})" if line is not None else ""


def _located(raw: str, line: int | None, path: str | None) -> str:
    """An entry as named in a warning: by its path in a policy document, else
    by its line in the text ("'x' (line 3)")."""
    if path is not None:
        return f"{path} {raw!r}"
    return f"{raw!r}{_where(line)}"


# --------------------------------------------------------------------------
# Classifying one entry
# --------------------------------------------------------------------------


def _classify(raw: str) -> tuple[str, bool, bool] | _Rejection:
    """Return (name, covers_subdomains, was_written_with_star) or why not."""
    return _plain_entry(raw) or _classify_fully(raw)


def _plain_entry(raw: str) -> tuple[str, bool, bool] | None:
    """The answer _classify_fully gives for the overwhelmingly common entry, 'host.example.com' or
    '.example.com' in ASCII letters, digits and hyphens, in one regex instead of a dozen checks (a 100,000-entry
    list is validated on every reload); None for anything else, which then gets every check. Such an entry is no
    URL, IP literal, port or wildcard (it has no ':', '/' or '*', and its last label is not numeric), has only
    valid labels, no trailing dot and at least two labels, so of _classify_fully's checks only the length, the
    'xn--' (punycode is checked by idna), the numeric last label and the public suffix remain, in that order."""
    if not raw.isascii():
        return None
    text = raw.lower()
    match = _PLAIN_ENTRY.fullmatch(text)
    if match is None:
        return None
    name = match[1]
    if len(name) > _MAX_NAME_OCTETS or "xn--" in name or name.rsplit(".", 1)[-1].isdigit():
        return None
    if _is_public_suffix(name):
        return None
    return name, text.startswith("."), False


def _classify_fully(raw: str) -> tuple[str, bool, bool] | _Rejection:
    text = _fold(raw)
    if isinstance(text, _Rejection):
        return text

    # Order matters: the most fundamental problem is reported first (an
    # IPv6 literal is full of colons but is not "a port"; a URL has a '/'
    # but is better explained as a URL).
    if "://" in text:
        return _reject_with_host("is a URL, not a domain", _url_host(text))
    ip_kind = _ip_kind(text)
    if ip_kind is not None:
        return _Rejection(f"is an {ip_kind}", _IP_FIX)
    if "/" in text:
        return _reject_with_host("is a URL path, not a domain", _url_host("//" + text))
    if ":" in text:
        host, _, port = text.rpartition(":")
        if port.isdigit() and ":" not in host:
            inner = _classify(host) if host else None
            if isinstance(inner, tuple):
                suggestion = f".{inner[0]}" if inner[1] else inner[0]
                return _Rejection(
                    "includes a port",
                    f"drop the port and use '{suggestion}' "
                    "(allowed ports are a separate setting, EGRESS_ALLOWED_PORTS)",
                )
            if isinstance(inner, _Rejection):
                return _Rejection(
                    f"includes a port, and its host {inner.why}", inner.fix
                )
        return _invalid_character(text, ":")

    was_star = False
    if "*" in text:
        if text == "*":
            return _Rejection(
                "is a bare wildcard that would allow every destination",
                "list the domains to allow; '.example.com' allows a domain and all its subdomains",
            )
        if text.startswith("*.") and "*" not in text[2:]:
            # Common habit from TLS certificates and other proxies; the
            # meaning is unambiguous, so accept it (with a warning).
            was_star = True
            text = text[1:]
        else:
            return _Rejection(
                "has a '*' wildcard in an unsupported position",
                "only a leading '*.' is understood; "
                "write '.example.com' to allow a domain and all its subdomains",
            )

    subdomains = text.startswith(".")
    name = text[1:] if subdomains else text
    # Exactly one trailing dot (the DNS root) is dropped; a second one is an
    # empty label and is reported as such below.
    name = name.removesuffix(".")
    if not name:
        return _Rejection(
            "has no domain name",
            "write a host such as 'example.com' or a domain such as '.example.com'",
        )

    result = _to_alabels(name, prefix="." if subdomains else "")
    if isinstance(result, _Rejection):
        return result
    name = result

    if name.rsplit(".", 1)[-1].isdigit():
        # No TLD is numeric; this is a short-hand IPv4 ('10.1', '127.1') that
        # resolvers would happily accept.
        return _Rejection(
            "looks like an IP address (its last label is numeric)", _IP_FIX
        )
    if _is_public_suffix(name):
        return _Rejection(
            "is a public suffix, not a domain anyone controls",
            f"list a registrable domain under it, e.g. '.example.{name}'",
        )
    if "." not in name:
        # Not a known TLD (e.g. 'localhost', 'test', 'intranet'): a single
        # label is almost surely a mistake, and Squid's dstdomain matching of
        # single labels is surprising.
        example = f".example.{name}" if subdomains else f"{name}.example.com"
        return _Rejection(
            "is a single-label name, not a fully qualified domain",
            f"use a fully qualified name, e.g. '{example}'",
        )
    return name, subdomains, was_star


def _fold(raw: str) -> str | _Rejection:
    """Case-fold the entry the way DNS / IDNA does.

    ASCII entries are simply lowercased (fast path: a 100k-entry list must
    parse in well under the 2 s budget and idna is ~20 us per call).  Other
    entries go through the UTS46 mapping, which also turns full-width
    letters and ideographic full stops ('。') into their ASCII forms, so that
    the structural checks below see what a resolver would see.
    """
    if raw.isascii():
        return raw.lower()
    try:
        # std3_rules=False: let characters like '_' and '/' through the
        # mapping so that our own checks can explain them precisely.
        return str(idna.uts46_remap(raw, std3_rules=False, transitional=False))
    except idna.IDNAError as exc:
        return _Rejection(
            f"is not a valid internationalised domain name ({exc})",
            "check the spelling, or write the name in its 'xn--' punycode form",
        )


def _to_alabels(name: str, *, prefix: str = "") -> str | _Rejection:
    """Validate a folded name (no leading/trailing dot) and return A-labels.

    `prefix` ('.' for domain entries) is only used to word suggestions.
    """
    if (
        len(name) <= _MAX_NAME_OCTETS
        and _LDH_NAME.fullmatch(name)
        and "xn--" not in name
    ):
        # Fast path for the overwhelmingly common plain ASCII name: one regex
        # instead of per-label checks (keeps 100k-entry lists well under 2 s).
        return name
    labels = name.split(".")
    out: list[str] = []
    for label in labels:
        if not label:
            return _empty_label(labels, prefix)
        if label.isascii():
            problem = _check_ascii_label(label)
            if problem is not None:
                return problem
            out.append(label)
            continue
        try:
            alabel = idna.alabel(label).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            return _Rejection(
                f"has a label {label!r} that is not a valid internationalised name ({exc})",
                "check the spelling, or write the name in its 'xn--' punycode form",
            )
        problem = _check_ascii_label(alabel)
        if problem is not None:
            return problem
        out.append(alabel)
    result = ".".join(out)
    if len(result) > _MAX_NAME_OCTETS:
        return _Rejection(
            f"is {len(result)} octets long, over the DNS limit of {_MAX_NAME_OCTETS}",
            "check for a pasting mistake; no real host name is this long",
        )
    return result


def _empty_label(labels: list[str], prefix: str) -> _Rejection:
    why = "has an empty label (two dots in a row)"
    cleaned = prefix + ".".join(part for part in labels if part)
    # Only suggest the repaired entry if it is itself valid: '..com' must not
    # be "fixed" into the public suffix '.com'.
    if isinstance(_classify(cleaned), tuple):
        return _Rejection(why, f"remove the extra dot: use '{cleaned}'")
    return _Rejection(why, "remove the extra dots and list a valid domain")


def _check_ascii_label(label: str) -> _Rejection | None:
    if len(label) > _MAX_LABEL_OCTETS:
        return _Rejection(
            f"has a label of {len(label)} octets, over the DNS limit of {_MAX_LABEL_OCTETS}",
            "check for a pasting mistake; each part between dots must be at most 63 characters",
        )
    if not _LDH_LABEL.fullmatch(label):
        bad = next(
            ch
            for ch in label
            if not ("a" <= ch <= "z" or "0" <= ch <= "9" or ch == "-")
        )
        return _invalid_character(label, bad)
    if label.startswith("-") or label.endswith("-"):
        return _Rejection(
            f"has a label {label!r} that starts or ends with a hyphen",
            "host names cannot start or end a label with '-'; check the spelling",
        )
    if label.startswith("xn--"):
        # An ASCII 'xn--' label must be valid punycode, or it is a name no
        # resolver can look up.  (Other '--' in position 3-4, such as
        # 'rr1---sn-abc', is legal in host names and is accepted.)
        try:
            idna.ulabel(label)
        except (idna.IDNAError, UnicodeError):
            return _Rejection(
                f"has an invalid punycode label {label!r}",
                "check the spelling, or write the name in its Unicode form",
            )
    return None


def _invalid_character(text: str, char: str) -> _Rejection:
    if char == "_":
        fix = (
            "host names may contain only letters, digits and hyphens; underscores are "
            "refused because they occur only in DNS record names (like '_dmarc'), "
            "never in host names"
        )
    else:
        fix = "host names may contain only letters, digits, hyphens and dots"
    return _Rejection(f"contains the invalid character {char!r}", fix)


def _ip_kind(text: str) -> str | None:
    """Describe `text` if it is any form of IP literal, else None."""
    candidate = text
    if candidate.startswith("["):
        # '[::1]' or '[::1]:443'
        candidate = candidate[1:].split("]", 1)[0]
    else:
        # '.1.2.3.4' and '1.2.3.4.' are still IP addresses.
        candidate = candidate.removeprefix(".").removesuffix(".")
    if ":" not in candidate and not candidate[-1:].isdigit():
        # Cheap pre-filter: every IPv4 form ends in a digit and every IPv6
        # form has a colon; skipping ipaddress' exception path keeps big
        # lists fast.
        return None
    try:
        network = ipaddress.ip_network(candidate, strict=False)
    except ValueError:
        return None
    if "/" in candidate:
        return "IP network (CIDR), not a domain"
    return f"IP address (IPv{network.version})"


def _url_host(url: str) -> str | None:
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError:
        return None
    return host or None


def _reject_with_host(why: str, host: str | None) -> _Rejection:
    if host is None:
        return _Rejection(why, "write just the host name, e.g. 'example.com'")
    inner = _classify(host)
    if isinstance(inner, _Rejection):
        return _Rejection(f"{why}, and its host {inner.why}", inner.fix)
    name, subdomains, _ = inner
    suggestion = f".{name}" if subdomains else name
    return _Rejection(why, f"use '{suggestion}'")


@functools.cache
def _psl() -> PublicSuffixList:
    # Loading the bundled list takes ~70 ms: do it once, and only when needed.
    # ICANN section only: private suffixes such as 'github.io' are legitimate
    # things to allow ('.github.io' allows all GitHub Pages, a choice the
    # operator can make).  accept_unknown=False: an unknown TLD is not a
    # public suffix here; single labels are refused separately.
    return PublicSuffixList(only_icann=True, accept_unknown=False)


@functools.cache
def _public_suffix_rule_names() -> frozenset[str] | None:
    """Every name a public suffix rule is about: 'co.uk' for 'co.uk', 'kawasaki.jp' for '*.kawasaki.jp',
    'city.kobe.jp' for '!city.kobe.jp'; None if this publicsuffixlist keeps its rules elsewhere."""
    rules = getattr(_psl(), "_publicsuffix", None)
    if not isinstance(rules, frozenset) or not all(isinstance(rule, str) for rule in rules):
        return None
    return frozenset(rule.removeprefix("!").removeprefix("*.") for rule in rules)


def _is_public_suffix(name: str) -> bool:
    # The library finds a name public only through a rule that names it ('co.uk', '*.kawasaki.jp' for
    # 'kawasaki.jp' itself) or a wildcard on its parent ('*.kawasaki.jp' for 'city.kawasaki.jp'); an exception
    # only makes a name's parent public. So a name that no rule names, whose parent no rule names, is not public:
    # answered by two set lookups, not the library's walk over every suffix of the name (about a quarter of the
    # validation time of a big list). test_allowlist checks this against the library for every rule.
    rule_names = _public_suffix_rule_names()
    if rule_names is not None and name not in rule_names and name.partition(".")[2] not in rule_names:
        return False
    return bool(_psl().is_public(name))


def _normalise_host(host: str) -> str | None:
    """Normalise a host for allows(); None means 'not a host name: deny'."""
    text = _fold(host.strip())
    if isinstance(text, _Rejection):
        return None
    text = text.removesuffix(".")
    if not text or text.startswith(".") or _ip_kind(text) is not None:
        return None
    name = _to_alabels(text)
    if isinstance(name, _Rejection) or name.rsplit(".", 1)[-1].isdigit():
        return None
    return name
