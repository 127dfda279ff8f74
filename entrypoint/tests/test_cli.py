"""The CLI in-process: exit codes come from one mapping, and errors name what to fix."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from egress_proxy.cli import build_parser, main


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("EGRESS_"):
            monkeypatch.delenv(name)


def test_check_prints_the_normalised_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--allowed-domains", "B.example.com, .example.org"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == [".example.org", "b.example.com"] and "ok: 2 entries" in out.err


def test_check_without_a_source_exits_2_naming_the_three_ways(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "EGRESS_ALLOWLIST_FILE" in err and "EGRESS_ALLOWLIST_SECRET" in err and "EGRESS_ALLOWED_DOMAINS" in err


def test_run_without_a_source_exits_2_with_a_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    out = capsys.readouterr()
    record = json.loads(out.out)
    assert record["event"] == "startup_failed" and record["exit_code"] == 2
    assert "EGRESS_ALLOWLIST_SECRET" in record["message"] and out.err == ""


def test_unknown_variable_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EGRESS_ALLOWLIST_FLIE", "/tmp/x")
    assert main(["check", "--allowed-domains", "a.example.com"]) == 2
    assert "did you mean EGRESS_ALLOWLIST_FILE?" in capsys.readouterr().err


def test_missing_file_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--allowlist-file", str(tmp_path / "nope.txt")]) == 4
    assert "nope.txt" in capsys.readouterr().err


def test_bad_entry_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--allowed-domains", "example.com:443"]) == 2
    assert "example.com:443" in capsys.readouterr().err


def test_health_without_status_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--state-dir", str(tmp_path)]) == 1
    assert "unhealthy: no status" in capsys.readouterr().out


def test_render_uses_the_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--allowed-domains", ".example.com", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "conf") in out and ".example.com" in out


def test_run_turns_warnings_and_crashes_into_json_lines(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import sys
    import threading
    import warnings

    from egress_proxy import cli

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    cli._json_excepthooks()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("something odd", stacklevel=1)
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [r["event"] for r in lines] == ["python_warning", "crashed"]
    assert "something odd" in lines[0]["message"] and "RuntimeError: a bug" in lines[1]["traceback"]


def _every_command(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every (sub)command path of the parser, found in the parser itself so a new one is never missed."""
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _every_command(sub, (*prefix, name))
    return found


@pytest.mark.parametrize("command", _every_command(build_parser()), ids=" ".join)
def test_every_help_page_prints(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: egress-proxy"), out
    if command in {("run",), ("check",), ("render",), ("health",)}:
        # Every setting is on the page, with its help text as written (a '%' in it once crashed argparse).
        assert "--error-page PATH" in out and "%H" in out


# `allowlist` errors: each is raised with its exit code and printed once, by main, as "egress-proxy: error: ...".
@pytest.mark.parametrize(("argv", "env", "code", "message"), [
    (["allowlist", "suggest", "--min-requests", "0"], {}, 2, "--min-requests 0: use a whole number of at least 1"),
    (["allowlist", "suggest", "access.jsonl", "--log-group", "g"], {}, 2, "give FILEs or --log-group, not both"),
    (["allowlist", "suggest", "--log-group", "g", "--since", "soon"], {}, 2, "soon"),
    (["allowlist", "suggest", "--log-group", "g", "--since", "1h", "--until", "2h"], {}, 2,
     "--since 1h is not before --until 2h"),
    (["allowlist", "suggest", "{tmp}/nope.jsonl"], {}, 2, "cannot read {tmp}/nope.jsonl: No such file or directory"),
    (["allowlist", "suggest", "--merge", "{tmp}/nope.json"], {}, 2, "cannot read {tmp}/nope.json: No such file"),
    (["allowlist", "suggest", "--merge", "{tmp}/bad.txt"], {}, 2, "example.com:443"),
    (["allowlist", "push", "{tmp}/nope.txt", "--secret", "s"], {}, 2, "cannot read {tmp}/nope.txt: No such file"),
    (["allowlist", "diff", "{tmp}/bad.txt", "--secret", "s"], {}, 2, "nothing was written to the secret"),
    (["allowlist", "diff", "{tmp}/bad.txt", "--secret", "s"], {"EGRESS_CLIENT_CIDRS": "10.0.0.1/8"}, 2,
     "EGRESS_CLIENT_CIDRS: "),
    (["allowlist", "diff", "{tmp}/good.txt", "--against", "{tmp}/nope.txt"], {}, 4,
     "cannot read {tmp}/nope.txt: No such file"),
])
def test_allowlist_errors_exit_with_their_code_and_one_error_line(
        argv: list[str], env: dict[str, str], code: int, message: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.txt").write_text("example.com:443\n", encoding="utf-8")
    (tmp_path / "good.txt").write_text("example.com\n", encoding="utf-8")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in argv]) == code
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert lines[0].startswith("egress-proxy: error: ") and out.out == ""
    assert message.replace("{tmp}", str(tmp_path)) in out.err
    assert sum(line.startswith("egress-proxy: error:") for line in lines) == 1
