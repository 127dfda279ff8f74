"""Allowlist sources: inline setting, file, AWS Secrets Manager. Each returns raw text plus a version.

Only I/O lives here; parsing is the allowlist module's job. boto3 uses its normal credential chain and
region and honours AWS_ENDPOINT_URL, so moto_server and LocalStack work unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .settings import Settings

# Secrets Manager caps a secret at 64 KiB; a file gets more room (100k entries are about 2.5 MB).
MAX_FILE_BYTES = 8 * 1024 * 1024


class SourceUnavailable(RuntimeError):
    """The source could not be read right now (missing file, network, throttling, access denied)."""


@dataclass(frozen=True)
class Snapshot:
    text: str
    version: str  # file: content hash; secret: VersionId; inline: content hash


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
    """Checked every second: the content hash is the version, so editors that rewrite in place or swap
    files (vim, sed -i, a ConfigMap symlink flip) are all seen."""

    def __init__(self, path: Path, poll_interval: float = 1.0) -> None:
        self.path = path
        self.description = f"file {path}"
        self.poll_interval = poll_interval
        self._last_stat: tuple[int, int, int] | None = None
        self._last_version: str | None = None

    def _read_bytes(self) -> bytes:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise SourceUnavailable(f"cannot read allowlist file {self.path}: {exc.strerror or exc}") from None
        if len(data) > MAX_FILE_BYTES:
            raise SourceUnavailable(
                f"allowlist file {self.path} is over {MAX_FILE_BYTES // (1024 * 1024)} MiB; split it or use "
                "domain entries ('.example.com') instead of listing hosts"
            )
        return data

    def changed(self, known_version: str | None) -> bool:
        return self.read().version != known_version

    def read(self) -> Snapshot:
        data = self._read_bytes()
        return Snapshot(text=data.decode("utf-8", errors="replace"), version=_digest(data))


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
        return Snapshot(text=str(text), version=str(value.get("VersionId", _digest(str(text).encode()))))


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
