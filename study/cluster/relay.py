"""MLflow delivery through Ray: one relay actor per study, on the driver's node, owning the
study's spool and its Courier; trials and the driver hand it records without waiting on
MLflow."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from study.paths import JsonObject
from study.tracking.records import DeliveryStatus


@ray.remote(num_cpus=0, max_restarts=-1)
class Relay:
    """Owns the study's spool (on the driver's disk) and its Courier thread. Trials and the
    driver hand it batches of records; a batch is on disk when `put` returns, and is
    delivered to MLflow whenever the server is there. Restarted by Ray if it dies; the
    spool it leaves is delivered by the next one (or by `resume`)."""

    def __init__(self, folder: str, tracking_uri: str, max_bytes: int):
        from study.tracking.spool import Spool
        from study.tracking.courier import Courier

        self.courier = Courier(Spool(folder, max_bytes), tracking_uri).start()

    def put(self, records: list[JsonObject]) -> None:
        self.courier.put(records)

    def status(self) -> DeliveryStatus:
        return self.courier.status()


def relay_name(study: str) -> str:
    return f"dip-relay-{study}"


_RELAYS: dict[str, ActorHandle] = {}  # the driver holds its relay's handle: Ray ends an actor without one


def start_relay(study: str, folder: Path, tracking_uri: str) -> None:
    """The study's relay, pinned to this (the driver's) node: its spool is a local folder."""
    here = ray.get_runtime_context().get_node_id()
    max_bytes = int(float(os.environ.get("DIP_SPOOL_MAX_MB", "512")) * 2**20)
    _RELAYS[study] = Relay.options(
        name=relay_name(study), get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote(str(folder), tracking_uri, max_bytes)


class RelaySender:
    """Hands batches to the relay without waiting on MLflow. `settle` waits (briefly: the
    relay only writes to disk) for the relay to confirm, and returns what it has not: that
    goes into the next checkpoint, so a lost node loses nothing a checkpoint covers."""

    def __init__(self, name: str):
        self.relay = ray.get_actor(name)
        self.inflight: list[tuple[ray.ObjectRef, list[JsonObject]]] = []

    def __call__(self, records: list[JsonObject]) -> None:
        self.inflight.append((self.relay.put.remote(records), records))

    def settle(self, timeout: float = 10.0) -> list[JsonObject]:
        if self.inflight:
            ready, _ = ray.wait([r for r, _ in self.inflight], num_returns=len(self.inflight),
                                timeout=timeout)
            done = set(ready)
            left = []
            for ref, records in self.inflight:
                if ref not in done:
                    left.append((ref, records))
                    continue
                try:
                    ray.get(ref)
                except RayActorError:  # the relay restarted: hand the batch over again
                    left.append((self.relay.put.remote(records), records))
            self.inflight = left
        return [r for _, records in self.inflight for r in records]

    def wait_all(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.settle(max(0.0, deadline - time.monotonic())) and time.monotonic() < deadline:
            pass


def drain(study: str, say: Callable[[str], None], poll: float = 2.0) -> DeliveryStatus:
    """Wait until the relay has delivered everything (the server may be away for long);
    returns the relay's status. KeyboardInterrupt leaves the rest in the spool. Polls at
    20 ms first, doubling up to `poll`: the last batch of a healthy study is delivered in
    well under a second, and a fixed 2 s poll made every study's end wait for it twice."""
    relay = _RELAYS.get(study) or ray.get_actor(relay_name(study))
    said, wait = False, 0.02
    while True:
        st: DeliveryStatus = ray.get(relay.status.remote())
        if st.pending_batches == 0:
            return st
        if not said and st.down_since is not None:
            say(f"waiting for the MLflow server to take {st.pending_batches} batches of records "
                f"(Ctrl-C leaves them in {st.folder} for `resume`)")
            said = True
        time.sleep(wait)
        wait = min(poll, wait * 2)


def send(study: str, records: list[JsonObject]) -> None:
    """Driver side: hand records to the relay and wait until they are on disk."""
    if records:
        ray.get((_RELAYS.get(study) or ray.get_actor(relay_name(study))).put.remote(records))
