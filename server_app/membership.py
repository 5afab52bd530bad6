"""The Flower side of the roster: node ids, capacity queries, nodes joining and leaving.

The round state speaks client keys; this module is the one place that knows Flower
node ids. Every round it looks at the nodes the SuperLink lists as connected:

* keys whose node is no longer listed are released (the client has left);
* a node it has not asked yet (one that connected after round 1, or a restarted
  SuperNode with a new node id), a node that missed its last message, and a node whose
  claim was refused while the key's holder was connected get a capacity ``query``;
* the queries are pushed without waiting: their answers are pulled after the round's
  training replies, so a node that never answers does not stall a round. An answer is
  a claim of a client key (:meth:`flexmoe_core.roster.Roster.claim`); an admitted
  client is sampled from the next round on.
"""

from __future__ import annotations

import time
from collections import Counter
from logging import INFO, WARNING

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore import log

from flexmoe_core.roster import Roster
from flexmoe_core.settings import Settings

from .codec import NODE_UNAVAILABLE, decode_info, error_reason, query_message

POLL_S = 0.5  # how often discovery looks for new nodes and answers
PULL_S = 0.25  # how often a round pulls its replies (Flower's own loop waits 3 s)
REFRESH_S = 2.0  # how often a round looks for nodes that connected while it runs


def budget_note(memory_mb: float | None) -> str:
    """Say, for the log, which memory budget an automatic capacity came from."""
    return "" if memory_mb is None else f", from a memory budget of {memory_mb:.0f} MiB"


class Membership:
    """Tracks which node holds which client key, and asks new nodes their capacity.

    Parameters
    ----------
    settings : Settings
        The run's settings (``num_clients``, ``min_clients_per_round``, timeouts).
    roster : Roster
        The run's client keys (possibly known from a checkpoint).
    run_config : str
        The configuration sent with every query (JSON).
    """

    def __init__(self, settings: Settings, roster: Roster, run_config: str) -> None:
        self.settings, self.roster, self.run_config = settings, roster, run_config
        self.connected: set[int] = set()
        self.answered: set[int] = set()  # nodes whose query was answered (or refused)
        self.refused: set[int] = set()  # left out for this run (bad settings)
        self.retrying: set[int] = set()  # refused while the key's holder was connected
        self.probes: dict[str, tuple[int, float]] = {}  # message id -> (node, sent at)
        self.refusals: dict[int, str] = {}  # node -> why it was left out (quoted if too few)
        self.started = False  # after round 1 starts, joins are announced

    def who(self, node: int) -> str:
        """Name a node for the log: its Flower id and, once known, its client key."""
        key = self.roster.key_of(node)
        return f"node {node}" if key is None else f"node {node} (client {key})"

    def name(self, key: int) -> str:
        """Name a client key for the log: with the node that holds it, if any."""
        node = self.roster.holder_of(key)
        return f"client {key}" if node is None else self.who(int(node))  # type: ignore[call-overload]

    # ---------------------------------------------------------------- probes
    def refresh(self, grid: Grid) -> None:
        """Take in the nodes connected now: release leavers, ask newcomers (no waiting)."""
        self.connected = set(grid.get_node_ids())
        for key in self.roster.leave(self.connected):
            log(INFO, "Client %d left (its node is no longer connected)", key)
        self.answered &= self.connected
        self.refused &= self.connected
        self.retrying &= self.connected
        asking = {node for node, _ in self.probes.values()}
        wanted = (self.connected - self.answered - self.refused) | self.retrying
        wanted |= set(self.roster.unresponsive()) & self.connected
        messages = [query_message(n, self.run_config) for n in sorted(wanted - asking)]
        if messages:
            ids = list(grid.push_messages(messages))
            now = time.monotonic()
            for message, message_id in zip(messages, ids, strict=False):
                if message_id:
                    self.probes[message_id] = (message.metadata.dst_node_id, now)
        self.collect(grid)

    def collect(self, grid: Grid) -> None:
        """Pull the answers to outstanding queries and settle the claims they make."""
        if not self.probes:
            return
        for reply in grid.pull_messages(list(self.probes)):
            probe = self.probes.pop(reply.metadata.reply_to_message_id, None)
            if probe is not None:
                self._settle(probe[0], reply)

    def _settle(self, node: int, reply: Message) -> None:
        if reply.has_error():
            if reply.error.code != NODE_UNAVAILABLE:  # gone nodes just leave the list
                self._refuse(node, error_reason(reply.error.reason))
            return
        try:
            info = decode_info(reply)
        except ValueError as err:
            self._refuse(node, str(err))
            return
        key = info.key
        admission = self.roster.claim(
            node,
            key,
            info.capacity,
            self.connected,
            info.num_partitions,
            info.num_examples,
            info.memory_mb,
        )
        self.answered.add(node)
        if admission.admitted:
            self.retrying.discard(node)
            if self.started and admission.status != "kept":
                log(
                    INFO,
                    "Client %d %s on node %d (capacity %d%s): sampled from the next round",
                    key,
                    admission.status,
                    node,
                    self.roster.members[key].capacity,
                    budget_note(info.memory_mb),
                )
        elif admission.retry:
            if node not in self.retrying:
                log(WARNING, "Node %d refused for now: %s", node, admission.message)
            self.retrying.add(node)
        else:
            self._refuse(node, admission.message)

    def report_capacity(self, key: int, reply: Message) -> None:
        """Take the capacity a client reports with a reply (ignored, logged, if bad)."""
        try:
            info = decode_info(reply)
        except ValueError as err:
            problem: str | None = str(err)
        else:
            old = self.roster.members[key].capacity
            problem = self.roster.report_capacity(key, info.capacity, info.memory_mb)
            if problem is None and self.roster.members[key].capacity != old:
                log(
                    INFO,
                    "Client %d now reports capacity %d (was %d%s)",
                    key,
                    self.roster.members[key].capacity,
                    old,
                    budget_note(info.memory_mb),
                )
        if problem:
            log(WARNING, "Client %d: capacity report ignored: %s", key, problem)

    def _refuse(self, node: int, why: str) -> None:
        self.refusals[node] = why
        self.refused.add(node)
        self.answered.add(node)
        log(
            WARNING,
            "Node %d left out of this run (the run continues with the other nodes): %s",
            node,
            why,
        )

    def exchange(self, grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
        """Send a round's messages and collect their replies, asking newcomers meanwhile.

        Like Flower's ``Grid.send_and_receive`` (replies until all are in or
        ``timeout`` seconds pass), but while the round waits it also asks nodes that
        connect (a restarted SuperNode) for their capacity, so they train from the
        next round on instead of the one after. A grid whose ``synchronous`` attribute
        is true (the in-process grid) has every reply it will ever give right after
        the push.
        """
        pending = {i for i in grid.push_messages(messages) if i}
        replies: list[Message] = []
        deadline = time.monotonic() + timeout
        next_refresh = time.monotonic() + REFRESH_S
        while pending:
            got = list(grid.pull_messages(sorted(pending)))
            replies += got
            pending -= {r.metadata.reply_to_message_id for r in got}
            now = time.monotonic()
            if not pending or now >= deadline or getattr(grid, "synchronous", False):
                break
            if now >= next_refresh:
                self.refresh(grid)
                next_refresh = now + REFRESH_S
            time.sleep(PULL_S)
        return replies

    # --------------------------------------------------------------- waiting
    def expected(self) -> int:
        """Return how many clients to wait for before round 1.

        In simulation Flower gives every SuperNode ``num-partitions`` (its number of
        SuperNodes): that is the federation's size. Otherwise ``num_clients``.
        """
        partitions = self.roster.num_partitions()
        return max(partitions) if partitions else self.settings.num_clients

    def discover(self, grid: Grid) -> None:
        """Before round 1: wait for the federation's clients and learn their capacities.

        Raises
        ------
        RuntimeError
            If fewer than ``min_clients_per_round`` clients answered in time.
        """
        wait = self.settings.timeouts.wait_for_clients_s
        reply_wait = self.settings.timeouts.round_s
        deadline, last_log = time.monotonic() + wait, 0.0
        while True:
            self.refresh(grid)
            ready = len(self.roster.available(self.connected))
            now = time.monotonic()
            if ready >= self.expected():
                break
            waiting = [t for _, t in self.probes.values() if now - t < reply_wait]
            if not waiting and (now > deadline or len(self.connected) >= self.expected()):
                break  # every node asked has answered: no one else to wait for
            if now - last_log > 5:
                log(INFO, "Waiting for clients: %d of %d ready", ready, self.expected())
                last_log = now
            time.sleep(POLL_S)
        self._check_size(wait)
        self.started = True

    def _check_size(self, wait: float) -> None:
        ready, expected = len(self.roster.available(self.connected)), self.expected()
        wanted = self.settings.min_clients_per_round
        partitions = sorted(self.roster.num_partitions())
        if partitions and partitions != [self.settings.num_clients]:
            log(
                WARNING,
                "num_clients=%d, but the SuperNodes declare num-partitions=%s (in simulation "
                "Flower's num-supernodes): this run trains the federation's clients. To run "
                "%d clients, start as many: --federation-config 'num-supernodes=%d'",
                self.settings.num_clients,
                "/".join(map(str, partitions)),
                self.settings.num_clients,
                self.settings.num_clients,
            )
        if ready < wanted:
            reasons = Counter(self.refusals.values()).most_common(3)
            raise RuntimeError(
                f"Only {ready} of the {expected} expected clients answered within {wait:.0f} s "
                f"(timeouts.wait_for_clients_s), fewer than min_clients_per_round={wanted}. "
                + "".join(f"{n} nodes were left out: {why} " for why, n in reasons)
                + "In simulation start as many SuperNodes (--federation-config "
                f"'num-supernodes={expected}'); in deployment start more SuperNodes, raise "
                "timeouts.wait_for_clients_s or lower min_clients_per_round."
            )
        if ready < expected:
            log(
                WARNING,
                "Starting with %d of the %d expected clients; the others join when they connect",
                ready,
                expected,
            )
        capacities = list(self.roster.capacities().values())
        shown = capacities if len(capacities) <= 20 else dict(sorted(Counter(capacities).items()))
        log(INFO, "Clients: %d, capacities %s", len(capacities), shown)
        if budgets := self.roster.memory_budgets():
            log(
                INFO,
                "Capacities from memory (capacity=auto), MiB by client: %s",
                {k: round(v, 1) for k, v in budgets.items()},
            )

    def await_available(self, grid: Grid, server_round: int) -> dict[int, int]:
        """Return the capacities of the clients available now, waiting for enough of them.

        Raises
        ------
        RuntimeError
            If fewer than ``min_clients_per_round`` are available within
            ``timeouts.wait_for_clients_s`` (the last checkpoint allows a resume).
        """
        wanted = self.settings.min_clients_per_round
        wait = self.settings.timeouts.wait_for_clients_s
        deadline = time.monotonic() + wait
        while True:
            self.refresh(grid)
            keys = self.roster.available(self.connected)
            if len(keys) >= wanted:
                return self.roster.capacities(keys)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Round {server_round}: only {len(keys)} of the {len(self.roster.members)} "
                    f"clients of this run are online, fewer than min_clients_per_round="
                    f"{wanted}, after waiting {wait:.0f} s (timeouts.wait_for_clients_s). "
                    "Restart the missing SuperNodes and resume the run with "
                    "checkpoint.resume=<run dir>, or lower min_clients_per_round."
                )
            log(
                INFO,
                "Round %d: waiting for clients, %d of at least %d",
                server_round,
                len(keys),
                wanted,
            )
            time.sleep(1.0)
