"""The membership table's rules without AWS: what a failed poll keeps, what is logged once, what a lookup caches
and how it is rate-limited (the integration tests run it against moto_server and the ECS stand-in)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from egress_proxy import membership
from egress_proxy.identity_helper import Selector
from egress_proxy.membership import LOOKUP_BURST, IdentityRefresher, task_addresses
from egress_proxy.policy import parse_policy_value
from egress_proxy.settings import load_settings
from egress_proxy.squid_conf import StatePaths

SG = "sg-0aaaaaaaaaaaaaaaa"


class FakeAws:
    def __init__(self) -> None:
        self.members: dict[str, set[str]] = {}
        self.error: Exception | None = None
        self.by_address_calls = 0
        self.ecs_calls = 0
        self.prepared: list[set[str]] = []  # the selector kinds of each prepare()
        self.bridge_services: set[str] = set()

    def prepare(self, selectors: Iterable[Selector]) -> None:
        self.prepared.append({selector.kind for selector in selectors})

    def poll(self, selectors: Iterable[Selector]) -> dict[str, set[str]]:
        if self.error:
            raise self.error
        return {address: set(found) for address, found in self.members.items()}

    def by_addresses(self, addresses: list[str], selectors: Iterable[Selector]) -> dict[str, set[str]]:
        self.by_address_calls += 1
        if self.error:
            raise self.error
        return {a: set(self.members[a]) for a in addresses if self.members.get(a)}

    def service_addresses(self, selector: Selector) -> dict[str, str]:
        self.ecs_calls += 1
        return {address: selector.text for address, found in self.members.items() if selector.text in found}


class Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def event(self, level: str, event: str, message: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.events if event == name]


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def _refresher(tmp_path: Path) -> tuple[IdentityRefresher, FakeAws, Events, Clock]:
    settings = load_settings({}, {"EGRESS_IDENTITY_TTL": "5"})
    aws, events, clock = FakeAws(), Events(), Clock()
    (tmp_path / "identity").mkdir()
    refresher = IdentityRefresher(settings, StatePaths(tmp_path), events, None, aws=aws, clock=clock)  # type: ignore[arg-type]
    document = parse_policy_value(json.dumps({"policies": [{"name": "p", "clients": [SG], "allow": ["a.com"]}]}),
                                  source="test", client_cidrs=settings.client_cidrs)
    refresher.set_document(document)
    refresher.serve_lookups()
    return refresher, aws, events, clock


def _table(tmp_path: Path) -> dict[str, list[str]]:
    return dict(json.loads((tmp_path / "identity" / "members.json").read_text())["members"])


def test_a_failed_poll_keeps_the_last_membership_and_is_logged_once(tmp_path: Path) -> None:
    refresher, aws, events, _ = _refresher(tmp_path)
    aws.members = {"10.0.0.5": {SG}}
    refresher.poll_once()
    assert _table(tmp_path) == {"10.0.0.5": [SG]}
    aws.error = RuntimeError("Throttling")
    for _ in range(3):
        refresher.poll_once()
    assert _table(tmp_path) == {"10.0.0.5": [SG]}
    assert len(events.named("identity_refresh_failed")) == 1
    assert refresher.stats.failing and refresher.stats.poll_failures == 3
    aws.error = None
    aws.members = {}
    refresher.poll_once()
    assert _table(tmp_path) == {}
    assert len(events.named("identity_refresh_recovered")) == 1
    assert events.named("identity_membership_changed")[-1]["removed"] == ["10.0.0.5"]


def test_unchanged_polls_log_nothing(tmp_path: Path) -> None:
    refresher, aws, events, _ = _refresher(tmp_path)
    aws.members = {"10.0.0.5": {SG}}
    for _ in range(3):
        refresher.poll_once()
    assert len(events.named("identity_membership_changed")) == 1


def test_a_lookup_caches_no_selector_for_the_ttl(tmp_path: Path) -> None:
    refresher, aws, _, clock = _refresher(tmp_path)
    assert refresher.lookup("10.0.0.9") == {"members": []}
    assert refresher.lookup("10.0.0.9") == {"members": []}
    assert aws.by_address_calls == 1
    clock.now += 6
    aws.members = {"10.0.0.9": {SG}}
    assert refresher.lookup("10.0.0.9") == {"members": [SG]}
    assert _table(tmp_path) == {"10.0.0.9": [SG]}  # every helper sees it now, without asking again


def test_lookups_are_rate_limited_and_fail_closed(tmp_path: Path) -> None:
    refresher, aws, _, _ = _refresher(tmp_path)
    answers = [refresher.lookup(f"10.0.1.{n}") for n in range(LOOKUP_BURST + 5)]
    assert answers.count({"error": "lookup_rate_limited"}) == 5
    assert aws.by_address_calls == LOOKUP_BURST
    aws.error = RuntimeError("boom")
    assert refresher.lookup("10.0.2.1") == {"error": "lookup_rate_limited"}  # still no token: clock stood still


def test_a_task_without_an_eni_has_no_address() -> None:
    assert task_addresses({"lastStatus": "RUNNING", "attachments": []}) == []
    eni = {"type": "ElasticNetworkInterface", "details": [{"name": "privateIPv4Address", "value": "10.0.0.7"}]}
    assert task_addresses({"lastStatus": "RUNNING", "attachments": [eni]}) == ["10.0.0.7"]
    assert task_addresses({"lastStatus": "STOPPED", "attachments": [eni]}) == []


def test_a_lookup_socket_that_cannot_listen_is_logged_and_polls_go_on(tmp_path: Path) -> None:
    refresher, aws, events, _ = _refresher(tmp_path)
    (tmp_path / "identity" / "lookup.sock").mkdir()  # in the way: bind fails
    aws.members = {"10.0.0.5": {SG}}  # before start: the refresher's own first poll finds the same
    refresher.start()
    try:
        assert events.named("identity_lookup_unavailable")
        refresher.poll_once()
        assert _table(tmp_path) == {"10.0.0.5": [SG]}
    finally:
        refresher.stop()


def test_a_burst_of_new_ecs_tasks_lists_the_service_once(tmp_path: Path) -> None:
    refresher, aws, _, clock = _refresher(tmp_path)
    document = parse_policy_value(json.dumps({"policies": [
        {"name": "p", "clients": ["ecs:prod/api"], "allow": ["a.com"]}]}), source="test",
        client_cidrs=load_settings({}, {}).client_cidrs)
    refresher.set_document(document)
    aws.members = {f"10.0.3.{n}": {"ecs:prod/api"} for n in range(1, 6)}
    answers = [refresher.lookup(f"10.0.3.{n}") for n in range(1, 6)]
    assert answers == [{"members": ["ecs:prod/api"]}] * 5
    assert aws.ecs_calls == 1
    clock.now += 1.5
    aws.members["10.0.3.9"] = {"ecs:prod/api"}
    assert refresher.lookup("10.0.3.9") == {"members": ["ecs:prod/api"]}
    assert aws.ecs_calls == 2


def test_lookups_arriving_together_share_one_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """50 lookups that arrive while a call is out all wait for the next one: two calls, not one per lookup. The
    first call is held until the other lookups are queued (an observable count), so the result does not depend
    on how fast a busy machine starts 50 threads; and no lookup gives up waiting meanwhile."""
    monkeypatch.setattr(membership, "LOOKUP_WAIT", 120.0)
    refresher, aws, _, _ = _refresher(tmp_path)
    aws.members = {f"10.0.4.{n}": {SG} for n in range(0, 50, 2)}
    first_call = threading.Event()
    release = threading.Event()
    first_batch: list[str] = []
    answer = aws.by_addresses

    def held_first_call(addresses: list[str], selectors: Iterable[Selector]) -> dict[str, set[str]]:
        if not first_call.is_set():
            first_batch.extend(addresses)
            first_call.set()
            assert release.wait(120)
        return answer(addresses, selectors)

    aws.by_addresses = held_first_call  # type: ignore[method-assign]
    answers: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda a=f"10.0.4.{n}": answers.__setitem__(a, refresher.lookup(a)))
               for n in range(50)]
    for thread in threads:
        thread.start()
    assert first_call.wait(120)
    deadline = time.monotonic() + 120
    while True:  # every other lookup has joined the next batch
        with refresher._batch_lock:
            queued = len(refresher._batch)
        if queued + len(first_batch) == 50 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert queued + len(first_batch) == 50
    release.set()
    for thread in threads:
        thread.join()
    assert answers["10.0.4.2"] == {"members": [SG]} and answers["10.0.4.3"] == {"members": []}
    assert len(answers) == 50 and all("members" in a for a in answers.values())
    assert aws.by_address_calls <= 2  # the first call, then at most one for everything queued behind it


def test_the_aws_clients_are_prepared_when_a_document_names_clients_before_any_lookup(tmp_path: Path) -> None:
    # set_document runs before Squid starts (or reconfigures) with the document: the first lookup must not pay for
    # importing boto3 and loading the EC2 model inside its deadline.
    refresher, aws, _, _ = _refresher(tmp_path)
    assert aws.prepared == [{"sg"}] and aws.by_address_calls == 0
    refresher.set_document(parse_policy_value("a.com\n", source="test", client_cidrs=refresher.settings.client_cidrs))
    assert aws.prepared == [{"sg"}]  # a document of CIDRs alone needs no client
