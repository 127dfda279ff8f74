"""Unit tests for the pure allowlist policy (egress_proxy.allowlist)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable

import pytest

# isort: split
# (ruff classifies egress_proxy as first- or third-party depending on the
# directory it runs from; the split keeps the import order valid for both.)
from egress_proxy.allowlist import (
    MAX_PROBLEMS_SHOWN,
    MAX_VALUE_BYTES,
    MAX_WARNINGS,
    Allowlist,
    AllowlistError,
    AllowlistProblem,
    parse_allowlist,
    parse_allowlist_value,
)

IP_FIX = "list the host name instead; IP destinations are refused by design"


def rejection(text: str, **kwargs: str) -> AllowlistError:
    with pytest.raises(AllowlistError) as info:
        parse_allowlist(text, **kwargs)
    return info.value


def only_problem(text: str) -> AllowlistProblem:
    err = rejection(text)
    assert len(err.problems) == 1, err.problems
    return err.problems[0]


# --------------------------------------------------------------------------
# Accepted entries and normalisation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", ("example.com",)),
        (".example.com", (".example.com",)),
        ("Example.COM", ("example.com",)),
        (".EXAMPLE.com", (".example.com",)),
        ("example.com.", ("example.com",)),
        (".example.com.", (".example.com",)),
        ("bücher.example", ("xn--bcher-kva.example",)),
        ("Bücher.Example", ("xn--bcher-kva.example",)),
        (".bücher.example", (".xn--bcher-kva.example",)),
        ("xn--bcher-kva.example", ("xn--bcher-kva.example",)),
        ("ＥＸＡＭＰＬＥ．ｃｏｍ", ("example.com",)),  # full-width letters and dot
        ("straße.de", ("xn--strae-oqa.de",)),  # non-transitional UTS46
        ("\ufeffexample.com", ("example.com",)),  # BOM at start of a file
        ("allowed.test", ("allowed.test",)),
        (".wild.test", (".wild.test",)),
        ("a-b.example.com", ("a-b.example.com",)),
        ("rr1---sn-abc.googlevideo.com", ("rr1---sn-abc.googlevideo.com",)),
        ("123.example.com", ("123.example.com",)),
        (".github.io", (".github.io",)),  # private-section suffix: allowed
        ("city.kawasaki.jp", ("city.kawasaki.jp",)),  # PSL exception rule
        ("a" * 63 + ".com", ("a" * 63 + ".com",)),
    ],
)
def test_accepted_entries_are_normalised(text: str, expected: tuple[str, ...]) -> None:
    allowlist = parse_allowlist(text)
    assert allowlist.entries == expected
    assert allowlist.warnings == ()


def test_name_of_exactly_253_octets_is_accepted() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 57, "com"])
    assert len(name) == 253
    assert parse_allowlist(name).entries == (name,)


def test_star_dot_is_read_as_leading_dot_with_a_warning() -> None:
    allowlist = parse_allowlist("allowed.test\n*.Example.com\n")
    assert allowlist.entries == (".example.com", "allowed.test")
    assert len(allowlist.warnings) == 1
    warning = allowlist.warnings[0]
    assert "'*.Example.com'" in warning
    assert "(line 2)" in warning
    assert "read as '.example.com'" in warning


def test_star_dot_and_leading_dot_are_duplicates() -> None:
    allowlist = parse_allowlist("*.example.com .example.com")
    assert allowlist.entries == (".example.com",)
    assert any("duplicates" in w and "'.example.com'" in w for w in allowlist.warnings)


@pytest.mark.parametrize(
    "text",
    [
        "a.com,b.com,c.com",
        "a.com, b.com ,c.com",
        "a.com b.com\tc.com",
        "a.com\nb.com\r\nc.com\n",
        "\n\n  a.com  \n\n,,,\nb.com\n\n\nc.com\n\n",
        "# allowed hosts\na.com # the A host\nb.com,c.com#no space before comment\n",
        "a.com\u00a0b.com\u2003c.com",  # non-ASCII whitespace separates too
        "c.com\nb.com\na.com",  # output is sorted whatever the input order
    ],
)
def test_separators_comments_and_blank_lines(text: str) -> None:
    assert parse_allowlist(text).entries == ("a.com", "b.com", "c.com")


def test_comment_hides_what_would_otherwise_be_invalid() -> None:
    allowlist = parse_allowlist("# https://1.2.3.4:443/ is not allowed\nok.example.com")
    assert allowlist.entries == ("ok.example.com",)


def test_output_is_sorted_and_deterministic() -> None:
    text = "zeta.com .beta.com alpha.com .alpha.org mid.example.net"
    first = parse_allowlist(text)
    second = parse_allowlist(" ".join(reversed(text.split())))
    assert first.entries == second.entries
    assert list(first.entries) == sorted(first.entries)
    assert first.entries == (
        ".alpha.org",
        ".beta.com",
        "alpha.com",
        "mid.example.net",
        "zeta.com",
    )


# --------------------------------------------------------------------------
# Rejections
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "why", "fix"),
    [
        # IP literals
        ("1.2.3.4", "is an IP address", IP_FIX),
        (".1.2.3.4", "is an IP address", IP_FIX),
        ("1.2.3.4.", "is an IP address", IP_FIX),
        ("::1", "is an IP address", IP_FIX),
        ("2001:db8::1", "is an IP address", IP_FIX),
        ("[2001:db8::1]", "is an IP address", IP_FIX),
        ("[::1]:443", "is an IP address", IP_FIX),
        ("10.0.0.0/8", "IP network", IP_FIX),
        ("10.1", "looks like an IP address", IP_FIX),
        ("1.2.3.4:80", "is an IP address", IP_FIX),
        # ports
        ("example.com:443", "includes a port", "use 'example.com'"),
        ("example.com:443", "includes a port", "EGRESS_ALLOWED_PORTS"),
        (".example.com:8443", "includes a port", "use '.example.com'"),
        # URLs and paths
        ("https://example.com", "is a URL", "use 'example.com'"),
        ("http://example.com/", "is a URL", "use 'example.com'"),
        ("https://Example.com:8443/x?y=1", "is a URL", "use 'example.com'"),
        ("https://1.2.3.4/", "is an IP address", IP_FIX),
        ("example.com/path", "is a URL path", "use 'example.com'"),
        ("example.com:443/path", "is a URL path", "use 'example.com'"),
        # empty labels
        ("a..b.com", "empty label", "use 'a.b.com'"),
        (".a..b.com", "empty label", "use '.a.b.com'"),
        ("example.com..", "empty label", "use 'example.com'"),
        ("..com", "empty label", "list a valid domain"),
        (".", "has no domain name", "'.example.com'"),
        ("..", "has no domain name", "'.example.com'"),
        # lengths
        ("a" * 64 + ".com", "over the DNS limit of 63", "at most 63 characters"),
        (
            ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 58, "com"]),
            "over the DNS limit of 253",
            "pasting mistake",
        ),
        # characters
        ("a_b.example.com", "invalid character '_'", "underscores are refused"),
        ("_dmarc.example.com", "invalid character '_'", "underscores are refused"),
        ("user@example.com", "invalid character '@'", "letters, digits"),
        ("exa!mple.com", "invalid character '!'", "letters, digits"),
        ("example.com:", "invalid character ':'", "letters, digits"),
        ("-a.example.com", "starts or ends with a hyphen", "check the spelling"),
        ("a-.example.com", "starts or ends with a hyphen", "check the spelling"),
        ("xn--zz.com", "invalid punycode label 'xn--zz'", "Unicode form"),
        ("☃.com", "not a valid internationalised", "punycode form"),
        # wildcards
        ("foo*.com", "'*' wildcard in an unsupported position", "leading '*.'"),
        ("a.*.com", "'*' wildcard in an unsupported position", "leading '*.'"),
        ("*example.com", "'*' wildcard in an unsupported position", "leading '*.'"),
        ("*.*.example.com", "unsupported position", "'.example.com'"),
        ("*", "would allow every destination", "'.example.com'"),
        # public suffixes and single labels
        ("com", "is a public suffix", "e.g. '.example.com'"),
        (".com", "is a public suffix", "e.g. '.example.com'"),
        ("*.com", "is a public suffix", "e.g. '.example.com'"),
        ("co.uk", "is a public suffix", "e.g. '.example.co.uk'"),
        (".co.uk", "is a public suffix", "e.g. '.example.co.uk'"),
        ("CO.UK.", "is a public suffix", "e.g. '.example.co.uk'"),
        ("b.kawasaki.jp", "is a public suffix", "registrable domain"),  # *.kawasaki.jp
        (".рф", "is a public suffix", "registrable domain"),  # IDN TLD
        ("localhost", "single-label name", "'localhost.example.com'"),
        ("test", "single-label name", "fully qualified"),
        (".test", "single-label name", "'.example.test'"),
    ],
)
def test_each_rejection_names_the_entry_and_the_fix(
    entry: str, why: str, fix: str
) -> None:
    err = rejection(entry)
    assert len(err.problems) == 1
    problem = err.problems[0]
    assert problem.entry == entry
    assert problem.line == 1
    assert why in problem.why
    assert fix in problem.fix
    message = str(err)
    assert repr(entry) in message
    assert why in message
    assert fix in message


def test_url_message_matches_documented_format() -> None:
    err = rejection("ok.example.com\n\nhttps://example.com/x\n")
    assert str(err) == (
        "allowlist: allowlist entry 'https://example.com/x' (line 3) "
        "is a URL, not a domain; use 'example.com'"
    )


def test_every_bad_entry_is_reported_with_its_line() -> None:
    text = (
        "good.example.com\n"
        "1.2.3.4, https://example.org/x\n"
        "# comment with example.com:443\n"
        "example.net:443   .com\n"
        "fine.example.org\n"
        "foo*.com\n"
    )
    err = rejection(text, source="/etc/egress/allowlist.txt")
    found = [(p.entry, p.line) for p in err.problems]
    assert found == [
        ("1.2.3.4", 2),
        ("https://example.org/x", 2),
        ("example.net:443", 4),
        (".com", 4),
        ("foo*.com", 6),
    ]
    message = str(err)
    assert message.startswith(
        "5 invalid allowlist entries in /etc/egress/allowlist.txt:"
    )
    assert len(message.splitlines()) == 6
    for entry, line in found:
        assert f"allowlist entry {entry!r} (line {line})" in message
    # The good entries are not mentioned: whole-update rejection, not filtering.
    assert "good.example.com" not in message


def test_single_problem_message_names_the_source() -> None:
    err = rejection("1.2.3.4", source="secret:prod/egress")
    assert str(err).startswith("secret:prod/egress: allowlist entry '1.2.3.4' (line 1)")
    assert "\n" not in str(err)
    assert err.source == "secret:prod/egress"


def test_message_is_capped_but_problems_are_complete() -> None:
    bad = [f"10.0.0.{i}" for i in range(MAX_PROBLEMS_SHOWN + 7)]
    err = rejection("\n".join(bad))
    assert len(err.problems) == len(bad)
    assert [p.entry for p in err.problems] == bad
    lines = str(err).splitlines()
    assert lines[0] == f"{len(bad)} invalid allowlist entries in allowlist:"
    assert len(lines) == 1 + MAX_PROBLEMS_SHOWN + 1
    assert lines[-1].strip() == "... and 7 more"
    assert "'10.0.0.0'" in str(err)
    assert f"'10.0.0.{MAX_PROBLEMS_SHOWN}'" not in str(err)


def test_allowlist_error_is_a_value_error_and_pickles() -> None:
    err = rejection("1.2.3.4 example.com:80")
    assert isinstance(err, ValueError)
    clone = pickle.loads(pickle.dumps(err))
    assert isinstance(clone, AllowlistError)
    assert clone.problems == err.problems
    assert str(clone) == str(err)


def test_problem_str_without_line() -> None:
    problem = AllowlistProblem("1.2.3.4", "is an IP address", IP_FIX, None)
    assert str(problem) == f"allowlist entry '1.2.3.4' is an IP address; {IP_FIX}"


@pytest.mark.parametrize("parse", [parse_allowlist, parse_allowlist_value])
def test_oversized_input_is_refused_clearly(parse: Callable[..., Allowlist]) -> None:
    text = "a" * (MAX_VALUE_BYTES + 1)
    with pytest.raises(AllowlistError) as info:
        parse(text, source="big")
    (problem,) = info.value.problems
    assert str(MAX_VALUE_BYTES) in problem.why
    assert "8 MiB" in problem.why
    assert len(problem.entry) < 100  # quoted, not dumped


def test_oversized_is_measured_in_bytes_not_characters() -> None:
    # 3 bytes per character in UTF-8: under the limit in characters, over in bytes.
    text = "\u20ac" * (MAX_VALUE_BYTES // 3 + 1)
    assert len(text) < MAX_VALUE_BYTES
    with pytest.raises(AllowlistError, match="over the"):
        parse_allowlist(text)


# --------------------------------------------------------------------------
# Collapse of duplicates and overlaps
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "entries", "dropped", "covering"),
    [
        ("example.com .example.com", (".example.com",), "example.com", ".example.com"),
        (".example.com example.com", (".example.com",), "example.com", ".example.com"),
        (
            ".example.com www.example.com",
            (".example.com",),
            "www.example.com",
            ".example.com",
        ),
        (
            ".a.example.com .example.com",
            (".example.com",),
            ".a.example.com",
            ".example.com",
        ),
        (
            "x.y.a.example.com .a.example.com .example.com",
            (".example.com",),
            "x.y.a.example.com",
            ".example.com",  # the outermost cover is named
        ),
        (
            "*.a.example.com .example.com",
            (".example.com",),
            "*.a.example.com",
            ".example.com",
        ),
        (
            "WWW.Example.COM. .example.com",
            (".example.com",),
            "WWW.Example.COM.",
            ".example.com",
        ),
    ],
)
def test_covered_entries_are_dropped_with_a_warning(
    text: str, entries: tuple[str, ...], dropped: str, covering: str
) -> None:
    allowlist = parse_allowlist(text)
    assert allowlist.entries == entries
    expected = f"{dropped!r} (line 1) is already covered by '{covering}'; dropped"
    assert expected in allowlist.warnings


def test_exact_duplicates_collapse_with_warning() -> None:
    allowlist = parse_allowlist("example.com\nEXAMPLE.com.\nexample.com")
    assert allowlist.entries == ("example.com",)
    assert len(allowlist.warnings) == 2
    assert allowlist.warnings[0] == (
        "'EXAMPLE.com.' (line 2) duplicates 'example.com' (line 1)"
        " (both mean 'example.com'); dropped"
    )
    assert "(line 3)" in allowlist.warnings[1]


def test_idn_and_punycode_forms_are_duplicates() -> None:
    allowlist = parse_allowlist("bücher.example xn--bcher-kva.example")
    assert allowlist.entries == ("xn--bcher-kva.example",)
    assert len(allowlist.warnings) == 1
    assert "duplicates" in allowlist.warnings[0]


@pytest.mark.parametrize(
    "text",
    [
        "example.org .example.com",  # different domains
        "evilexample.com .example.com",  # label boundary, not string suffix
        "example.com.evil.net .example.com",
        "a.example.com b.example.com",  # siblings, no '.domain' entry
        ".a.example.com example.com",  # parent exact host does not cover children
        "example.com www.example.com",
    ],
)
def test_non_overlapping_entries_are_all_kept(text: str) -> None:
    allowlist = parse_allowlist(text)
    assert sorted(allowlist.entries) == sorted({e.lower() for e in text.split()})
    assert allowlist.warnings == ()


def test_result_is_minimal() -> None:
    text = """
        .example.com
        api.example.com
        .eu.example.com
        x.eu.example.com
        example.com
        example.org
        .example.org
        cdn.example.net
        cdn.example.net
        .sub.example.net
    """
    allowlist = parse_allowlist(text)
    assert allowlist.entries == (
        ".example.com",
        ".example.org",
        ".sub.example.net",
        "cdn.example.net",
    )
    domains = {e[1:] for e in allowlist.entries if e.startswith(".")}
    for entry in allowlist.entries:
        name = entry.lstrip(".")
        labels = name.split(".")
        parents = {".".join(labels[i:]) for i in range(1, len(labels))}
        assert not parents & domains, entry
        if not entry.startswith("."):
            assert name not in domains
    assert len(allowlist.warnings) == 6


def test_many_warnings_are_capped_with_a_summary() -> None:
    hosts = [f"h{i}.example.com" for i in range(MAX_WARNINGS + 50)]
    allowlist = parse_allowlist(".example.com\n" + "\n".join(hosts))
    assert allowlist.entries == (".example.com",)
    assert len(allowlist.warnings) == MAX_WARNINGS + 1
    assert allowlist.warnings[-1] == "... and 50 more warnings"


def test_empty_allowlist_is_valid_and_warns() -> None:
    for text in ("", "   \n\n", "# only comments\n# here\n", " , ,\n"):
        allowlist = parse_allowlist(text)
        assert allowlist.entries == ()
        assert len(allowlist) == 0
        assert allowlist.warnings == (
            "the allowlist is empty: every request will be denied",
        )
        assert not allowlist.allows("example.com")


# --------------------------------------------------------------------------
# allows()
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy() -> Allowlist:
    return parse_allowlist(
        ".example.com\nexact.example.org\nbücher.example\n.wild.test\nallowed.test"
    )


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "www.example.com",
        "x.y.example.com",
        "EXAMPLE.COM",
        "Www.Example.Com.",
        "example.com.",
        "exact.example.org",
        "EXACT.example.org.",
        "bücher.example",
        "BÜCHER.example",
        "xn--bcher-kva.example",
        "wild.test",
        "a.wild.test",
        "allowed.test",
        "  example.com  ",
    ],
)
def test_allows(policy: Allowlist, host: str) -> None:
    assert policy.allows(host)


@pytest.mark.parametrize(
    "host",
    [
        "evilexample.com",
        "example.com.evil.net",
        "example.co",
        "com",
        "example.org",  # only exact.example.org is listed
        "www.exact.example.org",  # exact entries do not cover subdomains
        "sub.allowed.test",
        "other.test",
        "buecher.example",
        "",
        ".",
        ".example.com",  # not a host name
        "*.example.com",
        "example.com..",
        "example.com:443",
        "https://example.com/",
        "a..example.com",
        "a_b.example.com",
        "1.2.3.4",
        "::1",
        "[::1]",
        "127.1",
        "exa mple.com",
        "x" * 64 + ".example.com",
    ],
)
def test_denies(policy: Allowlist, host: str) -> None:
    assert not policy.allows(host)


def test_ip_literal_never_matches_even_if_it_looks_listed() -> None:
    allowlist = parse_allowlist("example.com")
    assert not allowlist.allows("93.184.216.34")


# --------------------------------------------------------------------------
# Allowlist value object
# --------------------------------------------------------------------------


def test_diff() -> None:
    old = parse_allowlist("a.com .b.com c.com")
    new = parse_allowlist(".a.com .b.com d.com")
    added, removed = old.diff(new)
    assert added == (".a.com", "d.com")
    assert removed == ("a.com", "c.com")
    assert new.diff(old) == (removed, added)
    assert old.diff(old) == ((), ())


def test_diff_is_the_sorted_set_differences() -> None:
    random = __import__("random").Random(30)
    names = [f"{'.' if i % 3 == 0 else ''}h{i}.d{i % 7}.example" for i in range(300)]
    for _ in range(20):
        old = parse_allowlist(" ".join(random.sample(names, 120)))
        new = parse_allowlist(" ".join(random.sample(names, 150)))
        assert old.diff(new) == (tuple(sorted(set(new.entries) - set(old.entries))),
                                 tuple(sorted(set(old.entries) - set(new.entries))))


def test_len_equality_and_hash() -> None:
    first = parse_allowlist("example.com example.com .x.org")  # has a warning
    second = parse_allowlist(".x.org\nexample.com")
    assert len(first) == 2
    assert first.warnings and not second.warnings
    assert first == second  # same policy, whatever the warnings
    assert hash(first) == hash(second)
    assert first != parse_allowlist("example.com")


def test_allowlist_is_frozen() -> None:
    allowlist = parse_allowlist("example.com")
    with pytest.raises(AttributeError):
        allowlist.entries = ("evil.com",)  # type: ignore[misc]


def test_constructor_refuses_unsorted_or_duplicate_entries() -> None:
    with pytest.raises(ValueError):
        Allowlist(entries=("b.com", "a.com"))
    with pytest.raises(ValueError):
        Allowlist(entries=("a.com", "a.com"))
    direct = Allowlist(entries=(".a.com", "b.com"))
    assert direct.allows("x.a.com") and direct.allows("b.com")
    assert not direct.allows("x.b.com")


# --------------------------------------------------------------------------
# parse_allowlist_value (Secrets Manager)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "a.com, .b.com",
        "a.com\n.b.com\n",
        '{"allowed_domains": ["a.com", ".b.com"]}',
        '  \n{"allowed_domains": [".b.com", "A.com."]}\n',
        '{"allowed_domains": ["*.b.com", "a.com", "x.b.com"]}',
        json.dumps({"allowed_domains": ["a.com", ".b.com"]}, indent=2),
    ],
)
def test_value_forms(value: str) -> None:
    assert parse_allowlist_value(value, source="secret").entries == (".b.com", "a.com")


def test_value_json_empty_list_is_empty_allowlist() -> None:
    allowlist = parse_allowlist_value('{"allowed_domains": []}', source="secret")
    assert allowlist.entries == ()
    assert "empty" in allowlist.warnings[0]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (
            '{"allowed_domains": ["a.com" ".b.com"]}',
            "is not valid JSON: Expecting ',' delimiter at line 1 column 30",
        ),
        ('{"allowed_domains": ["a.com",]}', "is not valid JSON"),
        ("{allowed_domains: a.com}", "is not valid JSON"),
        ("{", "is not valid JSON"),
        (
            '{"allowed_domains": "a.com"}',
            "'allowed_domains' as a JSON string, not a list",
        ),
        ('{"allowed_domains": null}', "'allowed_domains' as a JSON null, not a list"),
        ('{"domains": ["a.com"]}', "has no 'allowed_domains' key"),
        ("{}", "has no 'allowed_domains' key"),
        (
            '{"allowed_domains": ["a.com"], "alowed_ports": [443]}',
            "has unexpected keys 'alowed_ports'",
        ),
        ('["a.com", ".b.com"]', "is a JSON list, not an object"),
    ],
)
def test_value_json_invalid_or_wrong_shape(value: str, why: str) -> None:
    with pytest.raises(AllowlistError) as info:
        parse_allowlist_value(value, source="secret:prod")
    (problem,) = info.value.problems
    assert why in problem.why
    assert problem.entry == value.strip()  # short values are quoted whole
    assert '{"allowed_domains": ["example.com", ".example.org"]}' in problem.fix
    assert problem.line is None
    assert str(info.value).startswith("secret:prod: ")


def test_value_json_error_truncates_long_values() -> None:
    value = (
        '{"allowed_domains": [' + ", ".join(f'"h{i}.com"' for i in range(200)) + ",]}"
    )
    with pytest.raises(AllowlistError) as info:
        parse_allowlist_value(value, source="secret")
    (problem,) = info.value.problems
    assert problem.entry.endswith("...")
    assert len(problem.entry) < 100
    assert problem.entry.startswith('{"allowed_domains": ["h0.com"')


def test_value_json_reports_every_bad_item_in_order() -> None:
    value = json.dumps(
        {"allowed_domains": ["ok.com", 1, "1.2.3.4", "", "a.com b.com", None, "x:1"]}
    )
    with pytest.raises(AllowlistError) as info:
        parse_allowlist_value(value, source="secret")
    problems = info.value.problems
    assert [p.entry for p in problems] == [
        "1",
        "1.2.3.4",
        "",
        "a.com b.com",
        "null",
        "x:1",
    ]
    assert "not a string" in problems[0].why
    assert problems[1].fix == IP_FIX
    assert "empty string" in problems[2].why
    assert '["a.com", "b.com"]' in problems[3].fix
    assert "null" in problems[4].why
    assert all(p.line is None for p in problems)


def test_value_bracketed_ipv6_is_not_mistaken_for_json() -> None:
    with pytest.raises(AllowlistError) as info:
        parse_allowlist_value("[::1]", source="secret")
    (problem,) = info.value.problems
    assert problem.entry == "[::1]"
    assert problem.fix == IP_FIX


# --------------------------------------------------------------------------
# Scale
# --------------------------------------------------------------------------


def test_hundred_thousand_entries_parse() -> None:
    hosts = [f"host{i}.svc{i % 7}.example{i % 1000}.com" for i in range(100_000)]
    text = "\n".join(hosts) + "\n.example5.com\n"
    assert len(text.encode()) < MAX_VALUE_BYTES
    allowlist = parse_allowlist(text)
    # 100 hosts live under example5.com and collapse into the '.example5.com' entry.
    assert len(allowlist) == 100_000 - 100 + 1
    assert list(allowlist.entries) == sorted(allowlist.entries)
    assert allowlist.allows("host99999.svc4.example999.com")
    assert allowlist.allows("anything.example5.com")
    assert not allowlist.allows("host99999.svc4.example999.com.evil.net")
    assert not allowlist.allows("host99999.svc3.example999.com")
    assert len(allowlist.warnings) == 100  # one per collapsed host, no summary
    assert all("covered by '.example5.com'" in w for w in allowlist.warnings)


# --------------------------------------------------------------------------
# Decoded JSON lists with paths (policy documents), coverage queries
# --------------------------------------------------------------------------


def test_parse_allowlist_items_names_items_by_path() -> None:
    from egress_proxy.allowlist import parse_allowlist_items

    allowlist = parse_allowlist_items(
        ["b.example.com", ".example.com", "*.example.org"], path="policies[2].allow"
    )
    assert allowlist.entries == (".example.com", ".example.org")
    assert allowlist.paths == {
        ".example.com": "policies[2].allow[1]",
        ".example.org": "policies[2].allow[2]",
    }
    assert allowlist.warnings == (
        "policies[2].allow[2] '*.example.org' was read as '.example.org' (the domain and all "
        "its subdomains); write '.example.org' to silence this warning",
        "policies[2].allow[0] 'b.example.com' is already covered by '.example.com'; dropped",
    )
    with pytest.raises(AllowlistError) as info:
        parse_allowlist_items(["ok.com", 7, "1.2.3.4"], path="policies[0].deny", source="doc")
    assert [p.path for p in info.value.problems] == [
        "policies[0].deny[1]",
        "policies[0].deny[2]",
    ]
    assert str(info.value).splitlines()[0] == "2 problems in doc:"


def test_parse_allowlist_items_empty_is_silent() -> None:
    from egress_proxy.allowlist import parse_allowlist_items

    assert parse_allowlist_items([], path="policies[0].deny").warnings == ()


def test_problem_with_path_renders_path_first() -> None:
    problem = AllowlistProblem("1.2.3.4", "is an IP address", IP_FIX, None, "policies[1].allow[3]")
    assert str(problem) == f"policies[1].allow[3]: '1.2.3.4' is an IP address; {IP_FIX}"
    bare = AllowlistProblem("", "is missing", "add it", path="policies[0].clients")
    assert str(bare) == "policies[0].clients: is missing; add it"


@pytest.mark.parametrize(
    ("entries", "entry", "covers", "overlaps"),
    [
        ("a.example.com", "a.example.com", True, True),
        ("a.example.com", "b.example.com", False, False),
        (".example.com", "a.example.com", True, True),
        (".example.com", ".a.example.com", True, True),
        (".example.com", ".example.com", True, True),
        ("a.example.com", ".example.com", False, True),
        (".a.example.com", ".example.com", False, True),
        ("example.com", ".example.com", False, True),
        ("x.example.com", ".example.org", False, False),
        ("notexample.com", ".example.com", False, False),
    ],
)
def test_covers_and_overlaps(entries: str, entry: str, covers: bool, overlaps: bool) -> None:
    allowlist = parse_allowlist(entries)
    assert allowlist.covers(entry) is covers
    assert allowlist.overlaps(entry) is overlaps


def test_the_public_suffix_shortcut_answers_as_the_library_does_for_every_rule() -> None:
    # _is_public_suffix skips the library for a name that no rule names and whose parent no rule names; check
    # that against the library itself on every name a rule is about, its parent and two names under it.
    from egress_proxy import allowlist

    psl = allowlist._psl()
    rule_names = allowlist._public_suffix_rule_names()
    assert rule_names is not None and "co.uk" in rule_names and "kawasaki.jp" in rule_names
    names = set()
    for rule_name in rule_names:
        names.update({rule_name, rule_name.partition(".")[2], f"city.{rule_name}", f"www.city.{rule_name}"})
    names.discard("")
    differing = [name for name in sorted(names) if allowlist._is_public_suffix(name) != bool(psl.is_public(name))]
    assert differing == []
    assert allowlist._is_public_suffix("kobe.jp") and not allowlist._is_public_suffix("city.kobe.jp")


@pytest.mark.parametrize("raw", [
    "example.com", ".example.com", "Example.COM", "a.b.c.d.example.org", "co.uk", ".co.uk", "example.co.uk",
    "kawasaki.jp", "city.kawasaki.jp", "x.city.kawasaki.jp", "city.kobe.jp", "github.io", ".github.io",
    "1.2.3.4", ".1.2.3.4", "10.1", "a.b.123", "a.b.0x1", "xn--bcher-kva.example", "xn--zz.example",
    "-a.example.com", "a-.example.com", "a--b.example.com", "rr1---sn-abc.googlevideo.com", "localhost", ".test",
    "example.com.", "example..com", "a_b.example.com", f"{'a' * 63}.com", f"{'a' * 64}.com",
    ".".join(["abcdefghi"] * 25) + ".com", ".".join(["abcdefghi"] * 26) + ".com", "bücher.example",
    "*.example.com", "example.com:443", "https://example.com", "example.com/path", "[::1]", "EXAMPLE.com",
])
def test_the_plain_entry_shortcut_gives_the_full_checks_answer(raw: str) -> None:
    from egress_proxy import allowlist

    shortcut = allowlist._plain_entry(raw)
    assert shortcut is None or shortcut == allowlist._classify_fully(raw)
    assert allowlist._classify(raw) == allowlist._classify_fully(raw)
