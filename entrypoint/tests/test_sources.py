"""Allowlist sources without AWS: inline, file (change detection, errors) and the secret reader's logic with
an injected client object (the integration suite runs it against moto_server)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from egress_proxy.sources import MAX_SECRET_BYTES, FileSource, InlineSource, SecretSource, SourceUnavailable


def test_inline_source_never_changes() -> None:
    source = InlineSource("a.example.com")
    snapshot = source.read()
    assert snapshot.text == "a.example.com" and snapshot.version.startswith("sha256:")
    assert source.changed(None) and not source.changed(snapshot.version)


def test_file_source_sees_edits_and_caches_unchanged_files(tmp_path: Path) -> None:
    path = tmp_path / "allowlist.txt"
    path.write_text("a.example.com\n")
    source = FileSource(path)
    first = source.read()
    old = first.version
    os.utime(path, (1_000_000, 1_000_000))  # an old mtime: not "racy", so the cache may answer
    source.read()
    reads = source.reads
    assert source.read().version == old and source.reads == reads  # cached: stat() only
    path.write_text("b.example.com\n")
    assert not source.changed(old)  # just written: taken at the next check that finds it unmoved
    assert source.changed(old) and source.read().text == "b.example.com\n"


def test_file_source_never_takes_a_file_half_written(tmp_path: Path) -> None:
    """A rewrite in place truncates, then writes: a check in between must not see an empty (deny-all) list."""
    path = tmp_path / "allowlist.txt"
    path.write_text("a.example.com\nb.example.com\n")
    source = FileSource(path)
    good = source.read()
    with open(path, "w") as handle:  # truncated, nothing written yet
        handle.flush()
        assert source.read() == good
        handle.write("a.example.com\n")
        handle.flush()
        assert source.read() == good  # it moved again since the last check: still settling
    assert source.read().text == "a.example.com\n"  # unmoved since the last check: taken


def test_file_source_takes_an_old_file_at_once(tmp_path: Path) -> None:
    """A file swapped in whole, written a while ago (a ConfigMap symlink flip, mv of a prepared file), waits for
    nothing."""
    path, prepared = tmp_path / "allowlist.txt", tmp_path / "prepared.txt"
    path.write_text("a.example.com\n")
    source = FileSource(path)
    source.read()
    prepared.write_text("b.example.com\n")
    os.utime(prepared, (1_000_000, 1_000_000))
    prepared.rename(path)
    assert source.read().text == "b.example.com\n"


def test_file_source_missing_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match="nope.txt"):
        FileSource(tmp_path / "nope.txt").read()


class FakeSecrets:
    """Stands in for the boto3 client object (injected, not patched): answers like Secrets Manager."""

    def __init__(self, value: str, version: str) -> None:
        self.value, self.version = value, version
        self.calls: list[str] = []
        self.fail: str | None = None

    def _maybe_fail(self, operation: str) -> None:
        self.calls.append(operation)
        if self.fail:
            raise ClientError({"Error": {"Code": self.fail, "Message": "nope"}}, operation)

    def describe_secret(self, SecretId: str) -> dict[str, Any]:  # noqa: N803 (boto3's name)
        self._maybe_fail("DescribeSecret")
        return {"VersionIdsToStages": {"old": ["AWSPREVIOUS"], self.version: ["AWSCURRENT"]}}

    def get_secret_value(self, SecretId: str) -> dict[str, Any]:  # noqa: N803
        self._maybe_fail("GetSecretValue")
        return {"SecretString": self.value, "VersionId": self.version}


def test_secret_source_fetches_the_value_only_when_the_version_moved() -> None:
    fake = FakeSecrets("a.example.com", "v1")
    source = SecretSource("allowlist", poll_interval=30, client=fake)
    snapshot = source.read()
    assert (snapshot.text, snapshot.version, snapshot.max_bytes) == ("a.example.com", "v1", MAX_SECRET_BYTES)
    fake.calls.clear()
    assert not source.changed("v1") and fake.calls == ["DescribeSecret"]
    fake.version = "v2"
    assert source.changed("v1")


def test_secret_source_errors_carry_a_hint() -> None:
    fake = FakeSecrets("a.example.com", "v1")
    fake.fail = "AccessDeniedException"
    with pytest.raises(SourceUnavailable, match="secretsmanager:GetSecretValue"):
        SecretSource("allowlist", poll_interval=30, client=fake).read()
