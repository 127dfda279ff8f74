"""The SNI helper (sni_helper.py), driven over stdin/stdout as Squid drives it: real ClientHellos from Python's ssl
module in, OK/ERR out; and its host-name matching agrees with the policy module's."""

from __future__ import annotations

import base64
import json
import random
import ssl
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from egress_proxy import sni_helper
from egress_proxy.allowlist import parse_allowlist
from egress_proxy.policy import PolicyDocument, parse_policy_value
from egress_proxy.settings import load_settings
from egress_proxy.squid_conf import StatePaths, render, sni_helper_script

ENTRIES = "b.example.com z.aaa.net .example.org .deep.sub.example.net xn--bcher-kva.example"


def _client_hello(server_hostname: str | None) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _as_squid_sends(hello: bytes) -> str:
    # %>handshake is base64; the external ACL protocol URL-quotes it (+, / and = become %2B, %2F, %3D).
    return urllib.parse.quote(base64.b64encode(hello).decode(), safe="")


def _ask(tmp_path: Path, entries: str, handshakes: list[str], deny: str = "", policy: str = "default") -> list[str]:
    settings = load_settings({}, {})
    document = parse_policy_value(json.dumps({"policies": [
        {"name": "default", "clients": ["127.0.0.0/8"], "allow": entries.split(), "deny": deny.split()},
        {"name": "other", "clients": ["10.0.0.0/8"], "allow": [".other.example"]},
    ]}), source="test", client_cidrs=settings.client_cidrs)
    paths = StatePaths(tmp_path)
    for path, text in render(settings, document, paths, run_as=None, denial_port=1,
                             access_log_port=2).files(paths).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    script = tmp_path / "sni_helper.py"
    script.write_text(sni_helper_script())
    lines = "".join(f"{channel} {handshake} {policy}\n" for channel, handshake in enumerate(handshakes))
    result = subprocess.run([sys.executable, "-I", str(script), str(paths.policy_dir)], input=lines,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answers = result.stdout.splitlines()
    assert [answer.split(" ", 1)[0] for answer in answers] == [str(i) for i in range(len(handshakes))]
    return [answer.split(" ", 1)[1] for answer in answers]


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("b.example.com", "OK"),
        ("B.Example.COM", "OK"),
        ("a.example.com", "ERR sni_verdict=not_allowlisted"),
        ("www.example.org", "OK"),
        ("example.org", "OK"),
        ("a.b.c.example.org", "OK"),
        ("evilexample.org", "ERR sni_verdict=not_allowlisted"),
        ("example.org.evil.net", "ERR sni_verdict=not_allowlisted"),
        ("deep.sub.example.net", "OK"),
        ("sub.example.net", "ERR sni_verdict=not_allowlisted"),
        ("xn--bcher-kva.example", "OK"),
        (None, "ERR sni_verdict=missing"),
    ],
)
def test_answers_real_client_hellos(tmp_path: Path, sni: str | None, expected: str) -> None:
    assert _ask(tmp_path, ENTRIES, [_as_squid_sends(_client_hello(sni))]) == [expected]


@pytest.mark.parametrize(
    ("handshake", "expected"),
    [
        ("-", "ERR sni_verdict=missing"),
        ("not*base64", "ERR sni_verdict=malformed"),
        (base64.b64encode(b"GET / HTTP/1.1\r\n\r\n").decode(), "ERR sni_verdict=malformed"),
        (base64.b64encode(b"\x16\x03\x01\x00\x05\x01\x00").decode(), "ERR sni_verdict=malformed"),  # truncated
    ],
)
def test_answers_garbage_as_malformed(tmp_path: Path, handshake: str, expected: str) -> None:
    assert _ask(tmp_path, ENTRIES, [handshake]) == [expected]


@pytest.mark.parametrize(
    "raw",
    [b"a\x00.example.org", b"a\x01.example.org", b"192.0.2.1", b"::1", b"a" * 64 + b".example.org", b"",
     b"-a.example.org", b"a_b.example.org", b"caf\xc3\xa9.example.org", b"a..example.org", b"a.example.org..",
     (b"a" * 60 + b".") * 4 + b"example.org"],
)
def test_invalid_host_names_are_malformed(raw: bytes) -> None:
    with pytest.raises(sni_helper.Malformed):
        sni_helper.host_name(raw)


def test_host_name_normalises_case_and_one_trailing_dot() -> None:
    assert sni_helper.host_name(b"WWW.Example.ORG.") == "www.example.org"


def test_deny_wins_and_policies_are_separate(tmp_path: Path) -> None:
    hellos = [_as_squid_sends(_client_hello(name)) for name in ("www.example.org", "gist.example.org",
                                                                "a.other.example")]
    assert _ask(tmp_path, ENTRIES, hellos, deny="gist.example.org") == [
        "OK", "ERR sni_verdict=denied", "ERR sni_verdict=not_allowlisted"]
    assert _ask(tmp_path, ENTRIES, hellos, policy="other") == [
        "ERR sni_verdict=not_allowlisted", "ERR sni_verdict=not_allowlisted", "OK"]
    assert _ask(tmp_path, ENTRIES, hellos, policy="unknown") == ["ERR sni_verdict=not_allowlisted"] * 3


def test_agrees_with_the_policy_module() -> None:
    """The helper runs standalone (system python3, standard library only), so its match is a copy of
    Allowlist.allows: both walk a name's parents with sni_helper.name_and_parents, and this holds the two
    matches equal, for allow and deny lists alike, on the lists as the config writes them."""
    rng = random.Random(7)
    labels = ["a", "b", "example", "org", "com", "net", "sub", "deep", "evil", "aaa", "z"]
    hosts = [".".join(rng.choice(labels) for _ in range(rng.randint(2, 5))) for _ in range(3000)]
    allowlist = parse_allowlist(ENTRIES)
    settings = load_settings({}, {})
    rendered = render(settings, PolicyDocument.from_flat(allowlist, settings.client_cidrs), StatePaths(Path("/unused")),
                      run_as=None, denial_port=1, access_log_port=2)
    allowed = sni_helper.load_allowlist(rendered.lists[("default", "allow")].splitlines())
    expected = [allowlist.allows(host) for host in hosts]
    assert expected.count(True) > 20  # the sample exercises both answers
    assert [sni_helper.allowlisted(host, allowed) for host in hosts] == expected
    # A deny list, as a policy document writes it: the helper's deny match is the same function.
    document = parse_policy_value(json.dumps({"policies": [{"name": "p", "clients": ["10.0.0.0/8"],
                                                            "allow": ["z.aaa.net"],
                                                            "deny": ENTRIES.split()}]}),
                                  source="test", client_cidrs=settings.client_cidrs)
    rendered = render(settings, document, StatePaths(Path("/unused")), run_as=None, denial_port=1, access_log_port=2)
    denied = sni_helper.load_allowlist(rendered.lists[("p", "deny")].splitlines())
    deny_list = document.policies[0].deny
    expected = [deny_list.allows(host) for host in hosts]
    assert expected.count(True) > 20
    assert [sni_helper.allowlisted(host, denied) for host in hosts] == expected


def test_empty_allowlist_refuses_everything(tmp_path: Path) -> None:
    hellos = [_as_squid_sends(_client_hello("example.com")), "-"]
    assert _ask(tmp_path, "", hellos) == ["ERR sni_verdict=not_allowlisted", "ERR sni_verdict=missing"]
