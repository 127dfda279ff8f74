"""The awk SNI helper, driven over stdin/stdout as Squid drives it, agrees with the policy module's matching."""

from __future__ import annotations

import random
import shlex
import subprocess
from pathlib import Path

import pytest

from egress_proxy.allowlist import parse_allowlist
from egress_proxy.settings import load_settings
from egress_proxy.squid_conf import AWK, StatePaths, render, sni_policy_script

ENTRIES = "b.example.com z.aaa.net .example.org .deep.sub.example.net xn--bcher-kva.example"


def _ask(tmp_path: Path, entries: str, lookups: list[str]) -> list[str]:
    allowlist = parse_allowlist(entries)
    rendered = render(load_settings({}, {}), allowlist, StatePaths(tmp_path), run_as=None, denial_port=1)
    listing = tmp_path / "allowlist.txt"
    listing.write_text(rendered.allowlist_text)
    script = tmp_path / "sni_allowlisted.awk"
    script.write_text(sni_policy_script())
    result = subprocess.run([*shlex.split(AWK), "-f", str(script), str(listing)],
                            input="".join(line + "\n" for line in lookups), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("b.example.com", "OK"),
        ("B.Example.COM.", "OK"),
        ("a.example.com", "ERR"),
        ("www.example.org", "OK"),
        ("example.org", "OK"),
        ("a.b.c.example.org", "OK"),
        ("evilexample.org", "ERR"),
        ("example.org.evil.net", "ERR"),
        ("deep.sub.example.net", "OK"),
        ("sub.example.net", "ERR"),
        ("xn--bcher-kva.example", "OK"),
        ("-", "ERR"),
        ("", "ERR"),
    ],
)
def test_answers(tmp_path: Path, sni: str, expected: str) -> None:
    assert _ask(tmp_path, ENTRIES, [sni]) == [expected]


def test_agrees_with_the_policy_module(tmp_path: Path) -> None:
    rng = random.Random(7)
    labels = ["a", "b", "example", "org", "com", "net", "sub", "deep", "evil", "aaa", "z"]
    hosts = [".".join(rng.choice(labels) for _ in range(rng.randint(2, 5))) for _ in range(3000)]
    allowlist = parse_allowlist(ENTRIES)
    expected = ["OK" if allowlist.allows(host) else "ERR" for host in hosts]
    assert expected.count("OK") > 20  # the sample exercises both answers
    assert _ask(tmp_path, ENTRIES, hosts) == expected


def test_empty_allowlist_refuses_everything(tmp_path: Path) -> None:
    assert _ask(tmp_path, "", ["example.com", "-"]) == ["ERR", "ERR"]
