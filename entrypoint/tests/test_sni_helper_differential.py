"""Differential test: the compiled SNI helper (sni_helper.c) gives the same answer as the reference model
(sni_helper.py) for every input line, both driven over stdin/stdout as Squid drives them, on the same list files.

The inputs are generated from a fixed seed (the same corpus on every run, so a failure reproduces) and bounded in
count: real ClientHellos from OpenSSL, ClientHellos built field by field (odd extensions, repeated ones, several
names, names at every edge of the host-name rules, records split and padded), byte-level mutations of both, then
the encodings around them (base64 padding, URL quoting, whitespace, missing fields, unknown policies). The list
files carry exact hosts, domains and deny entries over a small label alphabet, so that the suffix matching is
exercised on both sides of every answer.
"""

from __future__ import annotations

import base64
import collections
import random
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from test_sni_helper import _client_hello as real_hello  # OpenSSL's own ClientHello for a name

from egress_proxy.squid_conf import sni_helper_script

ROOT = Path(__file__).resolve().parents[2]
SEED = 25
LINES = 12_000
LABELS = ["a", "b", "api", "example", "org", "com", "net", "sub", "deep", "evil", "x1", "z-z", "0", "123"]
VERDICTS = {"OK", "ERR sni_verdict=missing", "ERR sni_verdict=malformed", "ERR sni_verdict=denied",
            "ERR sni_verdict=not_allowlisted"}


@pytest.fixture(scope="module")
def compiled_helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's sni_helper.c, built the way scripts/test and the image build it."""
    binary = tmp_path_factory.mktemp("sni-helper-build") / "sni_helper"
    result = subprocess.run([str(ROOT / "scripts" / "build-sni-helper"), str(binary)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"scripts/build-sni-helper failed:\n{result.stderr}"
    return binary


def _policy_dir(root: Path, rng: random.Random) -> Path:
    """Three policies plus an empty one. Entries are what the renderer writes (one a line), with the odd line
    a hand edit could add: blanks, padding, CRLF or CR line ends, a comment."""
    directory = root / "policies"
    directory.mkdir()

    def entry() -> str:
        name = ".".join(rng.choice(LABELS) for _ in range(rng.randint(1, 4)))
        return ("." + name) if rng.random() < 0.5 else name

    for policy in ("default", "team-a", "team-b"):
        allow = {entry() for _ in range(40)} | {"example.org", ".example.com"}
        deny = {entry() for _ in range(6)} | {"evil.example.com"}
        for kind, entries in (("allow", allow), ("deny", deny)):
            text = "".join(entry + rng.choice(["\n", "\n", "\n", "\r\n", "\r", " \n", "\t\n", "\n\n  \n"])
                           for entry in sorted(entries))
            text += "# a comment line\n" + rng.choice(["", "last.example.org"])  # the last line may lack its newline
            (directory / f"{policy}.{kind}").write_text(text)
    (directory / "empty.allow").write_text("")
    (directory / "notes.txt").write_text("example.org\n")  # not a list file: both ignore it
    return directory


# --- ClientHellos ----------------------------------------------------------------------------------------------
def _vec(data: bytes, width: int) -> bytes:
    return len(data).to_bytes(width, "big") + data


def host_name(rng: random.Random) -> bytes:
    """A name near the rules' edges: valid LDH names mostly, and each way of breaking them."""
    labels = [rng.choice(LABELS) for _ in range(rng.randint(1, 5))]
    name = ".".join(labels)
    roll = rng.random()
    if roll < 0.35:
        pass
    elif roll < 0.45:
        name = "".join(c.upper() if rng.random() < 0.5 else c for c in name)
    elif roll < 0.5:
        name += "."
    elif roll < 0.55:
        name += rng.choice(["..", ".", "-", "-.com"])
    elif roll < 0.6:
        name = rng.choice(["-", "a-", "-a", "a.-b", "a.b-"]) + "." + name
    elif roll < 0.65:
        name = ".".join(str(rng.randint(0, 255)) for _ in range(4))
    elif roll < 0.7:
        name = "x" * rng.choice([62, 63, 64]) + "." + name
    elif roll < 0.75:
        name = ".".join(["a" * 63] * 3 + ["b" * rng.randint(57, 63)])  # around 253 octets
        name += rng.choice(["", "."])
    elif roll < 0.8:
        name = rng.choice(["", ".", "a..b", "_x.com", "a b.com", "x.123", "x.1a"])
    raw = name.encode()
    if rng.random() < 0.08:
        position = rng.randint(0, len(raw))
        raw = raw[:position] + bytes([rng.choice([0, 1, 0x7F, 0x80, 0xC3, 0xFF, ord("*")])]) + raw[position:]
    return raw


def server_name_extension(names: list[bytes], rng: random.Random) -> bytes:
    entries = b"".join(bytes([0 if rng.random() < 0.97 else rng.randint(1, 3)]) + _vec(name, 2) for name in names)
    return (0).to_bytes(2, "big") + _vec(_vec(entries, 2), 2)


def built_hello(rng: random.Random) -> bytes:
    """A ClientHello built field by field, in one or more TLS records."""
    extensions = []
    for _ in range(rng.randint(0, 5)):
        kind = rng.choice([10, 11, 13, 16, 23, 35, 43, 45, 51, 65281, rng.randint(1, 65535)])
        extensions.append(kind.to_bytes(2, "big") + _vec(rng.randbytes(rng.randint(0, 12)), 2))
    roll = rng.random()
    if roll < 0.75:
        names = [host_name(rng)]
    elif roll < 0.85:
        names = [host_name(rng) for _ in range(rng.randint(0, 3))]
    else:
        names = []
    sni = [server_name_extension(names, rng)] if names or rng.random() < 0.3 else []
    if rng.random() < 0.05:
        sni.append(server_name_extension([host_name(rng)], rng))  # a second server_name extension
    if rng.random() < 0.03 and extensions:
        extensions.append(extensions[0])  # a repeated extension of another kind
    block = extensions + sni
    rng.shuffle(block)
    body = (b"\x03\x03" + rng.randbytes(32) + _vec(rng.randbytes(rng.choice([0, 32])), 1)
            + _vec(b"\x13\x01\x13\x02\xc0\x2f", 2) + _vec(b"\x00", 1))
    if block or rng.random() < 0.9:
        body += _vec(b"".join(block), 2)
    if rng.random() < 0.03:
        body += b"\x00"  # bytes after the extensions block
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return records(message, rng)


def records(message: bytes, rng: random.Random) -> bytes:
    cuts = sorted(rng.sample(range(1, len(message)), k=min(len(message) - 1, rng.choice([0, 0, 0, 1, 2]))))
    pieces = [message[a:b] for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True)]
    if rng.random() < 0.05:
        pieces.insert(rng.randint(0, len(pieces)), b"")  # an empty record
    out = b"".join(b"\x16\x03" + bytes([rng.choice([1, 1, 3, 0])]) + _vec(piece, 2) for piece in pieces)
    if rng.random() < 0.05:
        out += rng.choice([b"\x16\x03\x01\x00\x02ab", b"\x17\x03\x03\x00\x01x", b"\x16"])  # trailing bytes
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if not data:
            break
        position = rng.randrange(len(data))
        if roll < 0.4:
            data[position] ^= 1 << rng.randrange(8)
        elif roll < 0.6:
            data[position] = rng.choice([0, 1, 0xFF, 0x16, 0x03])
        elif roll < 0.75:
            del data[position: position + rng.randint(1, 8)]
        elif roll < 0.85:
            data[position:position] = rng.randbytes(rng.randint(1, 4))
        else:
            del data[position:]  # truncated
    return bytes(data)


# --- how Squid hands it over -----------------------------------------------------------------------------------
def encoded(records_: bytes, rng: random.Random) -> str:
    text = base64.b64encode(records_).decode()
    roll = rng.random()
    if roll < 0.05:
        text = text.rstrip("=") + "=" * rng.randint(0, 4)
    elif roll < 0.08 and text:
        position = rng.randrange(len(text))
        text = text[:position] + rng.choice(["=", "*", "-", "_", "\x00", "%"]) + text[position:]
    elif roll < 0.1:
        text = text + rng.choice(["=", "==", "QQ", "Q", "QQ=="])
    roll = rng.random()
    if roll < 0.8:
        return urllib.parse.quote(text, safe="")  # what Squid sends: +, / and = as %2B, %2F, %3D
    if roll < 0.9:  # lower-case escapes
        return re.sub("%[0-9A-F]{2}", lambda escape: escape.group().lower(), urllib.parse.quote(text, safe=""))
    if roll < 0.95:
        return text  # unescaped
    return urllib.parse.quote(text, safe="") + rng.choice(["%", "%4", "%zz", "%C3%A9", "%FF", "%80", "%0A", "%20"])


def line(hello: bytes | None, rng: random.Random, channel: int) -> str:
    handshake = "-" if hello is None else encoded(hello, rng)
    policy = rng.choice(["default", "default", "team-a", "team-b", "empty", "unknown"])
    roll = rng.random()
    if roll < 0.9:
        return f"{channel} {handshake} {policy}"
    if roll < 0.93:
        return f"{channel}\t{handshake}\t\t{policy} extra fields\r"
    if roll < 0.96:
        return rng.choice([f"{channel} {handshake}", f"{channel}", "", "  ", f"{channel} - {policy}"])
    return f"{channel} {handshake} {policy}" + rng.choice(["\x0b", "\x1c", " \x1f"])


def corpus(rng: random.Random) -> list[str]:
    reals = [real_hello(name) for name in ("example.org", "www.example.org", "api.example.com", "evil.example.com",
                                           "Sub.Deep.Example.NET", "x.org", "123.example.org", "a.b.c.d.org")]
    reals.append(real_hello(None))
    lines: list[str] = []
    while len(lines) < LINES:
        roll = rng.random()
        if roll < 0.1:
            hello: bytes | None = rng.choice(reals)
        elif roll < 0.2:
            hello = mutate(rng.choice(reals), rng)
        elif roll < 0.75:
            hello = built_hello(rng)
        elif roll < 0.97:
            hello = mutate(built_hello(rng), rng)
        elif roll < 0.98:
            hello = rng.randbytes(rng.randint(0, 64))
        else:
            hello = None
        lines.append(line(hello, rng, len(lines) % 64))
    return lines


def _answers(command: list[str], lines: list[str]) -> list[str]:
    # The last line goes without its newline: both must answer it anyway.
    result = subprocess.run(command, input="\n".join(lines).encode(), capture_output=True, timeout=300)
    assert result.returncode == 0, f"{command[0]} failed: {result.stderr.decode(errors='replace')}"
    return result.stdout.decode().split("\n")[:-1]


def test_compiled_helper_answers_as_the_reference_does(tmp_path: Path, compiled_helper: Path) -> None:
    rng = random.Random(SEED)
    policies = _policy_dir(tmp_path, rng)
    lines = corpus(rng)
    script = tmp_path / "sni_helper.py"
    script.write_text(sni_helper_script())
    reference = _answers([sys.executable, "-I", str(script), str(policies)], lines)
    compiled = _answers([str(compiled_helper), str(policies)], lines)
    assert len(reference) == len(lines)
    differences = [(text, want, got) for text, want, got in zip(lines, reference, compiled, strict=False)
                   if want != got]
    assert len(compiled) == len(reference) and not differences, (
        f"{len(differences)} of {len(lines)} answers differ (seed {SEED}); first ones (line, reference, compiled):\n"
        + "\n".join(repr(d) for d in differences[:10]))
    # The corpus must reach every verdict, often: a generator that drifted to all-malformed would prove nothing.
    verdicts = collections.Counter(answer.split(" ", 1)[1] for answer in reference)
    assert set(verdicts) == VERDICTS, verdicts
    assert min(verdicts.values()) >= 100, verdicts


def test_compiled_helper_answers_many_lines_in_one_read(tmp_path: Path, compiled_helper: Path) -> None:
    """Squid writes up to concurrency= lines before reading: every one gets its answer, in order, whatever the
    read boundaries (a 200 KiB line spans several reads)."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.allow").write_text(".example.org\n")
    hello = urllib.parse.quote(base64.b64encode(real_hello("www.example.org")).decode(), safe="")
    lines = [f"{i} {hello} default" for i in range(500)] + ["500 " + "QUFB" * 50_000 + " default"]
    assert _answers([str(compiled_helper), str(policies)], lines) == (
        [f"{i} OK" for i in range(500)] + ["500 ERR sni_verdict=malformed"])
