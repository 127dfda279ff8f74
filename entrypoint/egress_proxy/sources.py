"""Allowlist sources: inline setting, file, AWS Secrets Manager. Each returns raw text plus a version.

Only I/O lives here; parsing is the allowlist module's job. boto3 uses its normal credential chain and
region and honours AWS_ENDPOINT_URL, so moto_server and LocalStack work unchanged.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .allowlist import AllowlistError, AllowlistProblem
from .errors import ExitCode

if TYPE_CHECKING:
    from .settings import Settings

# Secrets Manager caps a SecretString at 64 KiB (moto and LocalStack do not, so we check it ourselves); a file
# gets more room (100k entries are about 2.5 MB).
MAX_SECRET_BYTES = 65536
MAX_FILE_BYTES = 8 * 1024 * 1024
# A file whose mtime is this recent is hashed even when stat() looks unchanged: a second write within the
# filesystem's timestamp granularity that keeps the size would otherwise go unseen ("racy git" problem).
_RACY_SECONDS = 2.0
# How often a file source is checked. A check that finds nothing costs one stat() (about 10 us, in the worker
# thread), a wake-up of the worker and one of the loop (which takes the unchanged answer when it wakes for the next
# check: see loop.next_wakeup): four a second cost about 2 ms of CPU a second on the bench machine, where a wake-up
# of a Python thread alone costs about 0.1 ms. A write waits about 0.14 s on average (at most 0.275 s, the jittered
# interval's longest) to be seen, where once a second made it 0.5 s (at most 1.1 s): the largest share of a
# 100,000-entry reload's time from the write to every worker applying it.
FILE_POLL_SECONDS = 0.25
# A file rewritten in place is truncated, then written: a check between the two would read an empty or partial
# list, and an empty list is valid (it denies everything). So a changed file whose mtime is younger than this is
# read only once its stat() has held still from one check to the next.
FILE_SETTLE_SECONDS = 0.25


class SourceUnavailable(RuntimeError):
    """The source could not be read right now (missing file, network, throttling, access denied)."""

    exit_code = ExitCode.NO_SOURCE


@dataclass(frozen=True)
class Snapshot:
    text: str
    version: str  # file: content hash; secret: VersionId; inline: content hash
    size: int = 0  # bytes of the value as stored (may exceed len(text) when the value was cut at max_bytes)
    max_bytes: int | None = None  # the source's size limit; check_size() enforces it


def check_size(snapshot: Snapshot, source: str) -> None:
    """Reject a value over its source's limit as a bad value (AllowlistError), like any invalid entry: the
    supervisor keeps the last good config, the CLI refuses to push it."""
    if snapshot.max_bytes is None or snapshot.size <= snapshot.max_bytes:
        return
    limit = snapshot.max_bytes
    label = f"{limit // 1024} KiB" if limit < 1024 * 1024 else f"{limit // (1024 * 1024)} MiB"
    head = snapshot.text[:60].replace("\n", " ")
    raise AllowlistError(
        [AllowlistProblem(
            entry=head + ("..." if len(snapshot.text) > 60 else ""),
            why=f"starts a value of {snapshot.size} bytes, over the {label} limit of {source}",
            fix="use '.example.com' entries to cover whole domains instead of listing hosts"
            + (", or switch to EGRESS_ALLOWLIST_FILE for very long lists" if limit == MAX_SECRET_BYTES else ""),
        )],
        source,
    )


class Source(Protocol):
    description: str
    poll_interval: float  # seconds between checks

    def changed(self, known_version: str | None) -> bool:
        """Cheap check: has the source moved from ``known_version``? May raise SourceUnavailable."""

    def read(self) -> Snapshot:
        """The current value. May raise SourceUnavailable."""


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


class InlineSource:
    def __init__(self, text: str) -> None:
        self._snapshot = Snapshot(text=text, version=_digest(text.encode()))
        self.description = "EGRESS_ALLOWED_DOMAINS"
        self.poll_interval = 3600.0  # never changes while running

    def changed(self, known_version: str | None) -> bool:
        return known_version != self._snapshot.version

    def read(self) -> Snapshot:
        return self._snapshot


class FileSource:
    """Checked four times a second (``FILE_POLL_SECONDS``): the content hash is the version, so editors that
    rewrite in place or swap files (vim, sed -i, a ConfigMap symlink flip) are all seen. A poll costs one stat()
    while nothing moved: the file is read and hashed only when its (device, inode, size, mtime) changed or its mtime
    is recent. A change made in the last ``FILE_SETTLE_SECONDS`` is taken at the next check that finds the same
    stat(), so a file being written is never taken half-written; until then the last snapshot answers."""

    def __init__(self, path: Path, poll_interval: float = FILE_POLL_SECONDS) -> None:
        self.path = path
        self.description = f"file {path}"
        self.poll_interval = poll_interval
        self._cached: tuple[tuple[int, int, int, int], Snapshot] | None = None
        self._settling: tuple[int, int, int, int] | None = None  # a fresh change's stat(), seen at one check
        self.reads = 0  # how many times the file was actually read (for tests and curiosity)

    def changed(self, known_version: str | None) -> bool:
        return self.read().version != known_version

    def read(self) -> Snapshot:
        try:
            # stat() before reading: any write after it moves the mtime, so a cached snapshot is never newer
            # than its key claims. os.stat follows a symlink flip to the new target.
            info = os.stat(self.path)
            key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            age = time.time() - info.st_mtime
            if self._cached is not None:
                if self._cached[0] == key and age >= _RACY_SECONDS:
                    return self._cached[1]
                if self._cached[0] != key and age < FILE_SETTLE_SECONDS and key != self._settling:
                    self._settling = key  # maybe mid-write: take it if the next check finds it unmoved
                    return self._cached[1]
            with open(self.path, "rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            self._cached = None
            raise SourceUnavailable(f"cannot read allowlist file {self.path}: {exc.strerror or exc}") from None
        self.reads += 1
        self._settling = None
        size = max(len(data), info.st_size)
        version = _digest(data) + (f"+{size}" if size > MAX_FILE_BYTES else "")  # an oversized tail counts
        snapshot = Snapshot(text=data.decode("utf-8", errors="replace"), version=version, size=size,
                            max_bytes=MAX_FILE_BYTES)
        self._cached = (key, snapshot)
        return snapshot


class SecretSource:
    """Polls DescribeSecret for the AWSCURRENT VersionId (cheap), fetches the value only when it moved."""

    def __init__(self, secret_id: str, poll_interval: float, client: Any | None = None) -> None:
        self.secret_id = secret_id
        self.description = f"secret {secret_id}"
        self.poll_interval = poll_interval
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Short timeouts and few retries: the supervisor has its own backoff and must stay responsive.
            config = Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"})
            self._client = boto3.client("secretsmanager", config=config)
        return self._client

    def _call(self, operation: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(SecretId=self.secret_id, **kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "ClientError")
            raise SourceUnavailable(
                f"Secrets Manager {operation} on {self.secret_id!r} failed: {code}: {error.get('Message', '')}"
                f"{_hint(code)}"
            ) from None
        except BotoCoreError as exc:
            raise SourceUnavailable(f"Secrets Manager {operation} on {self.secret_id!r} failed: {exc}") from None

    def current_version(self) -> str | None:
        described = self._call("describe_secret")
        for version_id, stages in (described.get("VersionIdsToStages") or {}).items():
            if "AWSCURRENT" in stages:
                return str(version_id)
        return None

    def changed(self, known_version: str | None) -> bool:
        return known_version is None or self.current_version() != known_version

    def read(self) -> Snapshot:
        value = self._call("get_secret_value")
        text = value.get("SecretString")
        if text is None:
            raise SourceUnavailable(
                f"secret {self.secret_id!r} has no SecretString (binary secrets are not supported); "
                "store the allowlist as text"
            )
        return Snapshot(text=str(text), version=str(value.get("VersionId", _digest(str(text).encode()))),
                        size=len(str(text).encode("utf-8", "surrogatepass")), max_bytes=MAX_SECRET_BYTES)


def _hint(code: str) -> str:
    hints = {
        "ResourceNotFoundException": " (check EGRESS_ALLOWLIST_SECRET and the region)",
        "AccessDeniedException": " (the task role needs secretsmanager:GetSecretValue and DescribeSecret)",
        "ThrottlingException": " (will back off and retry)",
    }
    return hints.get(code, "")


def make_source(settings: Settings) -> Source:
    if settings.allowlist_secret:
        return SecretSource(settings.allowlist_secret, settings.reload_interval)
    if settings.allowlist_file:
        return FileSource(settings.allowlist_file)
    return InlineSource(settings.allowed_domains or "")
