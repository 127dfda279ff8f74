"""container/Dockerfile builds with Docker's classic builder too, which is what `docker compose` falls back to on an
engine without the buildx plugin (Debian's docker.io, for one): it must use no BuildKit-only syntax.

The compose test cannot show this by building (its engine has no network, so the image is loaded instead), so
this checks the instructions the classic builder of Docker 20.10 rejects: RUN --mount/--network/--security,
COPY/ADD --link, --chmod and --checksum, heredocs, and a `# syntax=` frontend line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "container" / "Dockerfile", REPO / "tests" / "compose" / "moto-standin" / "Dockerfile"]
BUILDKIT_ONLY = [
    (re.compile(r"^\s*RUN\s+(?:--\S+\s+)*--(mount|network|security)\b", re.I | re.M), "RUN --{}"),
    (re.compile(r"^\s*(?:COPY|ADD)\s+(?:--\S+\s+)*--(link|chmod|checksum|parents|exclude)\b", re.I | re.M),
     "COPY/ADD --{}"),
    (re.compile(r"^\s*(?:RUN|COPY)\b.*<<-?\s*['\"]?(\w+)", re.I | re.M), "a heredoc (<<{})"),
    (re.compile(r"^#\s*(syntax)\s*=", re.I | re.M), "a `# {}=` frontend line"),
]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_uses_no_buildkit_only_syntax(dockerfile: Path) -> None:
    text = dockerfile.read_text(encoding="utf-8")
    found = [template.format(m.group(1)) for pattern, template in BUILDKIT_ONLY for m in pattern.finditer(text)]
    assert not found, f"{dockerfile.relative_to(REPO)} uses BuildKit-only syntax: {found}"


def test_check_is_not_vacuous() -> None:
    broken = "FROM x\nRUN --mount=type=secret,id=a true\nCOPY --chmod=644 a b\n"
    found = [template for pattern, template in BUILDKIT_ONLY if pattern.search(broken)]
    assert len(found) == 2
