"""Client identity from the AWS APIs: the membership table, its refresher thread and the on-demand lookup. [I/O]

Which addresses belong to the ``sg-``, ``tag:`` and ``ecs:`` selectors of the active document:

* every ``EGRESS_IDENTITY_REFRESH`` seconds (and at once when a document with new selectors is activated), EC2
  ``DescribeNetworkInterfaces`` filtered by ``group-id`` and by ``tag:KEY``, and ECS ``ListTasks`` +
  ``DescribeTasks`` for each service (the ENI address of each awsvpc task);
* on demand, for an address no poll has seen: ``DescribeNetworkInterfaces`` by ``addresses.private-ip-address``
  (and, with ``ecs:`` selectors, one poll of those services), rate-limited, with "no selector" cached for
  ``EGRESS_IDENTITY_TTL`` seconds. The identity helper (a Squid child running as Squid's user) asks on a unix
  socket and waits at most ``IDENTITY_LOOKUP_TIMEOUT`` seconds.

The table is written to one JSON file, atomically; each helper re-reads it when it changes. Squid is never
reconfigured for a membership change. An API error or throttling keeps the last known membership; the change of
state is logged once (not every poll) and counted. A successful poll replaces what the previous one found, so a
departed client (or a reused address) loses its old identity at the next poll; with Squid's cache on top, within
``EGRESS_IDENTITY_REFRESH + EGRESS_IDENTITY_TTL`` seconds.

ECS services with bridge or host networking have no task ENI: their tasks' address is the container instance's,
shared by every task on it. Such tasks are skipped (logged once per service); select the instance's security
group instead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .identity_helper import Selector
from .policy import PolicyDocument
from .settings import Settings
from .squid_conf import StatePaths
from .squid_process import atomic_write
from .threads import named_thread

Members = dict[str, set[str]]  # address -> membership selectors (their text)

# On-demand lookups: at most this many AWS calls a second, with this burst. EC2's DescribeNetworkInterfaces
# shares the account's (per region) request token bucket with every other Describe call, so a flood of
# unknown addresses must not starve anyone else. Over the budget a lookup fails closed (identity_error).
LOOKUP_RATE = 10.0
LOOKUP_BURST = 20
ECS_LOOKUP_REUSE = 1.0  # seconds an on-demand listing of the ecs: services serves further lookups
LOOKUP_THREADS = 64  # lookups waiting at once (for the next batch); more are answered "busy" at once
# Lookups arriving within this window share one EC2 call (up to LOOKUP_BATCH addresses): a task scaling out, or a
# fresh proxy meeting hundreds of clients, costs a few calls, not one per client. The rate above counts calls.
LOOKUP_BATCH_WINDOW = 0.02
LOOKUP_BATCH = 200
LOOKUP_WAIT = 1.8  # a lookup's answer within the helper's 2 s (IDENTITY_LOOKUP_TIMEOUT), or lookup_timeout
LOG_ADDRESSES = 20  # addresses named in one membership-change line (the counts are always complete)


@dataclass
class IdentityStats:
    """What the metrics read: the table's size, polls, failures and on-demand lookups."""

    active: bool = False  # the active document has sg-, ecs: or tag: selectors (else nothing is published)
    members: int = 0  # addresses with at least one membership selector
    polls: int = 0
    poll_failures: int = 0
    failing: bool = False
    lookups: int = 0  # on-demand lookups AWS answered
    lookup_failures: int = 0  # API errors, rate limits and "busy" answers (each one a refused client)
    last_poll_at: float | None = None  # wall clock of the last successful poll


class AwsMembership:
    """The AWS calls. boto3's usual chain: region from AWS_REGION, endpoint from AWS_ENDPOINT_URL, credentials
    from the task role. Every method raises on an API error; the caller decides what that means."""

    def __init__(self, ec2: Any = None, ecs: Any = None) -> None:
        self._ec2 = ec2
        self._ecs = ecs
        self._clients = threading.Lock()  # the poll and lookup threads both reach for a client first
        self.bridge_services: set[str] = set()  # ecs: selectors seen with tasks that have no ENI

    def prepare(self, selectors: Iterable[Selector]) -> None:
        """Create the clients ``selectors`` need, with the models of the calls they make, now rather than in the
        first on-demand lookup: importing boto3 and loading the EC2 model takes about a second of CPU (several
        on a busy or small task), which a new client's first request would spend inside its 2 s lookup deadline,
        and be refused. Raises what boto3 raises (no region, say); the polls report it."""
        kinds = {selector.kind for selector in selectors}
        if kinds & {"sg", "tag"}:
            self.ec2.get_paginator("describe_network_interfaces")
        if "ecs" in kinds:
            self.ecs.get_paginator("list_tasks")

    def _client(self, name: str) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"})
        return boto3.client(name, config=config)  # type: ignore[call-overload]

    @property
    def ec2(self) -> Any:
        with self._clients:
            if self._ec2 is None:
                self._ec2 = self._client("ec2")
            return self._ec2

    @property
    def ecs(self) -> Any:
        with self._clients:
            if self._ecs is None:
                self._ecs = self._client("ecs")
            return self._ecs

    def poll(self, selectors: Iterable[Selector]) -> Members:
        members: Members = {}
        chosen = list(selectors)
        groups = sorted({s.text for s in chosen if s.kind == "sg"})
        for start in range(0, len(groups), 200):  # a filter takes at most 200 values
            batch = set(groups[start:start + 200])
            for eni in self._enis([{"Name": "group-id", "Values": sorted(batch)}]):
                for group in eni.get("Groups", []):
                    if group.get("GroupId") in batch:
                        _add(members, eni_addresses(eni), group["GroupId"])
        for selector in (s for s in chosen if s.kind == "tag"):
            key, _, value = selector.text[4:].partition("=")
            for eni in self._enis([{"Name": f"tag:{key}", "Values": [value]}]):
                _add(members, eni_addresses(eni), selector.text)
        for selector in (s for s in chosen if s.kind == "ecs"):
            _add_all(members, self.service_addresses(selector))
        return members

    def by_addresses(self, addresses: Sequence[str], selectors: Iterable[Selector]) -> Members:
        """The ENI-based selectors (sg-, tag:) among ``selectors`` of the ENIs holding ``addresses`` (at most
        200 a call: one filter takes at most 200 values). Addresses in no selector are absent."""
        chosen = [s for s in selectors if s.kind in {"sg", "tag"}]
        found: Members = {}
        if not chosen:
            return found  # only ecs: selectors: no EC2 call
        wanted = set(addresses)
        by_family = {4: [a for a in addresses if ipaddress.ip_address(a).version == 4],
                     6: [a for a in addresses if ipaddress.ip_address(a).version == 6]}
        names = {4: "addresses.private-ip-address", 6: "ipv6-addresses.ipv6-address"}
        for family, values in by_family.items():
            if not values:
                continue
            for eni in self._enis([{"Name": names[family], "Values": values}]):
                groups = {group.get("GroupId") for group in eni.get("Groups", [])}
                tags = {f"tag:{tag.get('Key')}={tag.get('Value')}" for tag in eni.get("TagSet", [])}
                matched = {s.text for s in chosen if (s.kind == "sg" and s.text in groups)
                           or (s.kind == "tag" and s.text in tags)}
                if matched:
                    _add(found, [a for a in eni_addresses(eni) if a in wanted], *matched)
        return found

    def service_addresses(self, selector: Selector) -> dict[str, str]:
        """address -> the selector, for each awsvpc task of one ECS service that AWS wants running."""
        cluster, _, service = selector.text[4:].partition("/")
        arns: list[str] = []
        for page in self.ecs.get_paginator("list_tasks").paginate(
                cluster=cluster, serviceName=service, desiredStatus="RUNNING"):
            arns += page.get("taskArns", [])
        found: dict[str, str] = {}
        for start in range(0, len(arns), 100):  # DescribeTasks takes at most 100 tasks
            for task in self.ecs.describe_tasks(cluster=cluster, tasks=arns[start:start + 100]).get("tasks", []):
                addresses = task_addresses(task)
                if not addresses:
                    self.bridge_services.add(selector.text)
                found.update((address, selector.text) for address in addresses)
        return found

    def _enis(self, filters: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        for page in self.ec2.get_paginator("describe_network_interfaces").paginate(Filters=filters):
            yield from page.get("NetworkInterfaces", [])


def eni_addresses(eni: Mapping[str, Any]) -> list[str]:
    addresses = [item["PrivateIpAddress"] for item in eni.get("PrivateIpAddresses", []) if item.get("PrivateIpAddress")]
    if eni.get("PrivateIpAddress") and eni["PrivateIpAddress"] not in addresses:
        addresses.append(eni["PrivateIpAddress"])
    addresses += [item["Ipv6Address"] for item in eni.get("Ipv6Addresses", []) if item.get("Ipv6Address")]
    return addresses


def task_addresses(task: Mapping[str, Any]) -> list[str]:
    """A task's ENI addresses (awsvpc). Bridge and host tasks have none: their address is the instance's."""
    if task.get("lastStatus") in {"STOPPED", "DEPROVISIONING"}:
        return []
    addresses: list[str] = []
    for attachment in task.get("attachments", []):
        if attachment.get("type") != "ElasticNetworkInterface":
            continue
        for detail in attachment.get("details", []):
            if detail.get("name") in {"privateIPv4Address", "privateIPv6Address"} and detail.get("value"):
                addresses.append(detail["value"])
    return addresses


def _add(members: Members, addresses: Iterable[str], *selectors: str) -> None:
    for address in addresses:
        members.setdefault(address, set()).update(selectors)


def _add_all(members: Members, found: Mapping[str, str]) -> None:
    for address, selector in found.items():
        members.setdefault(address, set()).add(selector)


@dataclass
class _Waiter:
    """One address waiting for its batch: the answer, or why there is none."""

    done: threading.Event = field(default_factory=threading.Event)
    members: set[str] = field(default_factory=set)
    error: str | None = None


def _finish(batch: Mapping[str, _Waiter], error: str | None = None) -> None:
    for waiter in batch.values():
        waiter.error = error
        waiter.done.set()


class TokenBucket:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.updated = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


class IdentityRefresher:
    """The membership table, kept by one thread; the on-demand lookup server on a unix socket. A component of
    the supervisor (start/stop); the loop thread only hands it each activated document."""

    name = "identity"

    def __init__(self, settings: Settings, paths: StatePaths, logger: Any, user: str | None,
                 aws: AwsMembership | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.paths = paths
        self.logger = logger
        self.user = user
        self.aws = aws or AwsMembership()
        self.clock = clock
        self.stats = IdentityStats()
        self._selectors: tuple[Selector, ...] = ()
        self._polled: Members = {}
        self._looked_up: dict[str, tuple[set[str], float]] = {}  # address -> (selectors, learned at)
        self._negative: dict[str, float] = {}  # address -> when "no selector" expires
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._ecs_lock = threading.Lock()
        self._batch: dict[str, _Waiter] = {}  # addresses waiting for the next on-demand lookup
        self._batch_lock = threading.Lock()
        self._batch_ready = threading.Condition(self._batch_lock)
        self._ecs_listed: tuple[float, Members] = (float("-inf"), {})
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._bucket = TokenBucket(LOOKUP_RATE, LOOKUP_BURST, clock)
        self._slots = threading.BoundedSemaphore(LOOKUP_THREADS)
        self._thread = named_thread(self._run, "identity")
        self._server: socket.socket | None = None
        self._warned_bridge: set[str] = set()
        self._last_error: str | None = None

    # --- component ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.write()  # an empty table, so helpers never read a previous run's
        try:
            self._server = self._listen()
        except OSError as exc:  # e.g. a state dir path too long for a unix socket: lookups fail closed, polls go on
            self.logger.event("error", "identity_lookup_unavailable",
                              f"cannot listen on {self.paths.lookup_socket} ({exc}); addresses no poll has seen "
                              "are refused until a poll finds them", error=str(exc))
        else:
            named_thread(self._accept, "identity-lookup").start()
        self.serve_lookups()
        self._thread.start()

    def serve_lookups(self) -> None:
        """Start answering lookups (the batching thread); start() does it."""
        named_thread(self._run_batches, "identity-batch").start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        with self._batch_lock:
            self._batch_ready.notify_all()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()
        self._thread.join(timeout=1)

    def set_document(self, document: PolicyDocument) -> None:
        """The active document's membership selectors; a change polls at once."""
        selectors = tuple(dict.fromkeys(s for policy in document.policies for s in policy.selectors
                                        if s.membership))
        self.stats.active = bool(selectors)
        if selectors:
            # Before Squid is started or reconfigured with this document: its helpers may ask at once.
            with contextlib.suppress(Exception):  # no region, no credentials: the polls report it
                self.aws.prepare(selectors)
        with self._lock:
            changed = selectors != self._selectors
            self._selectors = selectors
            self._negative.clear()  # "no selector" meant the old document's selectors
        if changed:
            self._wake.set()

    # --- the table -----------------------------------------------------------------------------------------
    def _merged(self) -> Members:
        """What polls found, overridden by what on-demand lookups learned since the last poll started (the newer
        view of that address: never a union of two moments, which could keep a reused address's old group)."""
        with self._lock:
            merged: Members = {address: set(found) for address, found in self._polled.items()}
            merged.update((address, set(found)) for address, (found, _) in self._looked_up.items())
        return merged

    def table(self) -> dict[str, list[str]]:
        return {address: sorted(found) for address, found in sorted(self._merged().items()) if found}

    def write(self) -> None:
        # One writer at a time (the poll thread and lookup threads share atomic_write's temp file name), and the
        # table read inside the lock, so the last file written is the newest table.
        with self._write_lock:
            table = self.table()
            self.stats.members = len(table)
            try:
                atomic_write(self.paths.membership, json.dumps({"members": table}, separators=(",", ":")))
            except OSError as exc:  # the helpers keep the last table they read; the next change retries
                self.logger.event("error", "identity_write_failed", f"cannot write {self.paths.membership}: {exc}")

    # --- polling -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            if self._selectors:
                self.poll_once()
            self._wake.wait(self.settings.identity_refresh)

    def poll_once(self) -> None:
        with self._lock:
            selectors = self._selectors
        started = self.clock()
        try:
            found = self.aws.poll(selectors)
        except Exception as exc:  # an API error, throttling, no credentials: keep the last membership
            self._failed(exc)
            return
        self.stats.polls += 1
        self.stats.last_poll_at = time.time()
        if self.stats.failing:
            self.stats.failing = False
            self._last_error = None
            self.logger.event("info", "identity_refresh_recovered", "AWS membership polls succeed again",
                              members=len(found))
        wanted = {s.text for s in selectors}
        before = self._merged()
        with self._lock:
            self._polled = {address: sel & wanted for address, sel in found.items() if sel & wanted}
            # A lookup older than this poll is superseded by it (the poll saw the same ENIs, or saw them gone).
            self._looked_up = {a: v for a, v in self._looked_up.items() if v[1] > started}
        self._log_changes(before, self._merged())
        self._warn_bridge()
        self.write()

    def _failed(self, exc: Exception) -> None:
        self.stats.poll_failures += 1
        error = f"{type(exc).__name__}: {exc}"
        if not self.stats.failing or error != self._last_error:
            self.stats.failing = True
            self._last_error = error
            self.logger.event("warning", "identity_refresh_failed",
                              f"AWS membership poll failed ({error}); keeping the last known membership "
                              f"({self.stats.members} addresses)", error=error, members=self.stats.members)

    def _log_changes(self, before: Members, after: Members) -> None:
        by_selector: dict[str, tuple[list[str], list[str]]] = {}
        for address in sorted(set(before) | set(after)):
            old, new = before.get(address, set()), after.get(address, set())
            for selector in new - old:
                by_selector.setdefault(selector, ([], []))[0].append(address)
            for selector in old - new:
                by_selector.setdefault(selector, ([], []))[1].append(address)
        for selector, (added, removed) in sorted(by_selector.items()):
            count = sum(1 for found in after.values() if selector in found)
            self.logger.event("info", "identity_membership_changed",
                              f"{selector}: +{len(added)} -{len(removed)} addresses ({count} now)",
                              selector=selector, added=added[:LOG_ADDRESSES], removed=removed[:LOG_ADDRESSES],
                              members=count)

    def _warn_bridge(self) -> None:
        for selector in sorted(self.aws.bridge_services - self._warned_bridge):
            self._warned_bridge.add(selector)
            self.logger.event("warning", "identity_ecs_not_awsvpc",
                              f"{selector} has tasks without their own network interface (bridge or host "
                              "networking): their address is the instance's, so they are not selected; select "
                              "the instance's security group instead", selector=selector)

    # --- on-demand lookups ---------------------------------------------------------------------------------
    def lookup(self, address: str) -> dict[str, Any]:
        """One address's membership selectors, for a helper: {"members": [...]} or {"error": why}. Waits for the
        batch it joins (at most LOOKUP_WAIT seconds)."""
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            return {"error": "bad_address"}
        cached = self._cached(address)
        if cached is not None:
            return {"members": sorted(cached)}
        with self._batch_lock:
            waiter = self._batch.setdefault(address, _Waiter())
            self._batch_ready.notify()
        if not waiter.done.wait(LOOKUP_WAIT):
            self.stats.lookup_failures += 1
            return {"error": "lookup_timeout"}
        if waiter.error is not None:
            return {"error": waiter.error}
        return {"members": sorted(waiter.members)}

    def _cached(self, address: str) -> set[str] | None:
        """What is known without asking AWS: the table, or "no selector" (negative, or nothing to look for)."""
        with self._lock:
            known = self._polled.get(address)
            if known is None and address in self._looked_up:
                known = self._looked_up[address][0]
            if known:
                return known
            if not self._selectors or self._negative.get(address, 0.0) > self.clock():
                return set()
        return None

    def _run_batches(self) -> None:
        while not self._stopping.is_set():
            with self._batch_lock:
                while not self._batch and not self._stopping.is_set():
                    self._batch_ready.wait()  # stop() and each lookup notify: no timeout to wake an idle proxy
            if self._stopping.is_set():
                return
            self._stopping.wait(LOOKUP_BATCH_WINDOW)  # let the lookups arriving together share the call
            with self._batch_lock:
                batch = dict(list(self._batch.items())[:LOOKUP_BATCH])
                for address in batch:
                    del self._batch[address]
            self._lookup_batch(batch)

    def _lookup_batch(self, batch: dict[str, _Waiter]) -> None:
        with self._lock:
            selectors = self._selectors
        if not self._bucket.take():
            self.stats.lookup_failures += len(batch)
            return _finish(batch, error="lookup_rate_limited")
        try:
            found = self.aws.by_addresses(list(batch), selectors)
            ecs = self._ecs_members(selectors)
        except Exception as exc:
            self.stats.lookup_failures += len(batch)
            self.logger.event("warning", "identity_lookup_failed",
                              f"on-demand lookup of {len(batch)} addresses failed: {type(exc).__name__}: {exc}",
                              addresses=sorted(batch)[:LOG_ADDRESSES])
            return _finish(batch, error="lookup_failed")
        self.stats.lookups += len(batch)
        before = self._merged()
        now = self.clock()
        with self._lock:
            for address, waiter in batch.items():
                waiter.members = found.get(address, set()) | ecs.get(address, set())
                if waiter.members:
                    self._looked_up[address] = (waiter.members, now)
                else:
                    self._negative[address] = now + self.settings.identity_ttl
        if any(waiter.members for waiter in batch.values()):
            self._log_changes(before, self._merged())
            self.write()
        _finish(batch)

    def _ecs_members(self, selectors: tuple[Selector, ...]) -> Members:
        """Every ecs: selector's task addresses, listed at most once per ECS_LOOKUP_REUSE seconds for all the
        lookups meanwhile: a burst of new clients (a service scaling out) costs one round of ListTasks and
        DescribeTasks per service, not one per client."""
        services = [s for s in selectors if s.kind == "ecs"]
        if not services:
            return {}
        with self._ecs_lock:
            listed_at, members = self._ecs_listed
            if self.clock() - listed_at >= ECS_LOOKUP_REUSE:
                members = {}
                for selector in services:
                    _add_all(members, self.aws.service_addresses(selector))
                self._ecs_listed = (self.clock(), members)
            return members

    def _listen(self) -> socket.socket:
        path = self.paths.lookup_socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        os.chmod(path, 0o660)
        if self.user is not None:
            import pwd

            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        server.listen(64)
        return server

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                self.stats.lookup_failures += 1
                with contextlib.suppress(OSError), conn:
                    conn.sendall(b'{"error":"lookup_busy"}\n')
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(2)
                data = b""
                while not data.endswith(b"\n") and len(data) < 256:
                    chunk = conn.recv(256)
                    if not chunk:
                        break
                    data += chunk
                answer = self.lookup(data.decode("ascii", "replace").strip())
                conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass
        finally:
            self._slots.release()
