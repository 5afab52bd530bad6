"""Who takes part in a run: client keys, their capacities, and which connection holds each.

A *client key* (``client-id``, else ``partition-id``, else the node id) is what the
server remembers a client by: fitness rows, capacities, checkpoints and the order of
aggregation are keyed by it. A *holder* is the connection that speaks for a key now
(the Flower node id, opaque here). Keys outlive connections: a SuperNode that restarts
gets a new node id and, by claiming its key again, takes back everything kept under it.

Binding rules (:meth:`Roster.claim`):

* a key nobody holds goes to the first node that claims it;
* a key held by a node that is still *connected* cannot be taken, even when the
  holder answered late or not at all (a timeout says nothing about who the holder
  is): the second claimant is refused, with a message naming both nodes, and may ask
  again;
* a key whose holder has left (the SuperLink no longer lists it), or that the
  SuperLink has reported unavailable at least ``rebind_grace_s`` ago, goes to the next
  claimant: that is how a restarted node gets its key back.

A node that misses a message stays out of the sampling until it answers again; a node
that leaves the federation is forgotten, and a claim of its key is a rejoin.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass

from .capacity import parse_capacity


@dataclass
class Member:
    """One client key of the run.

    Attributes
    ----------
    key : int
        The client key.
    capacity : int
        k_c: how many experts the client holds (its latest report).
    holder : Hashable or None
        The connection that holds the key now; None while the client is away.
    responsive : bool
        Whether the holder answered its last message; a client that missed one is
        not sampled until it answers again.
    num_partitions : int or None
        The partition count its node config declares (simulation), if any.
    num_examples : int or None
        The training examples it declared when it claimed its key: its example count
        in an aggregation counts at most this (:mod:`flexmoe_core.aggregation`).
    unavailable_since : float or None
        When (the roster's clock) the SuperLink first reported the holder unavailable;
        None while it is not reported gone.
    """

    key: int
    capacity: int
    holder: Hashable | None = None
    responsive: bool = True
    num_partitions: int | None = None
    num_examples: int | None = None
    unavailable_since: float | None = None


@dataclass(frozen=True)
class Admission:
    """The answer to a claim of a client key.

    ``status`` is ``joined`` (a new key), ``rejoined`` (a key known from earlier in the
    run or from its checkpoint), ``kept`` (the holder claimed its own key again) or
    ``refused``. A refusal with ``retry`` is temporary: the key's holder is connected
    now, and the claimant may ask again once it is not.
    """

    status: str
    key: int
    message: str = ""
    retry: bool = False

    @property
    def admitted(self) -> bool:
        """Whether the claimant now holds the key."""
        return self.status != "refused"


class Roster:
    """The run's client keys with their capacities and current holders.

    Parameters
    ----------
    num_experts : int
        E: capacities must lie in [1, E].
    known : mapping of int to int, optional
        Capacities of keys known from an interrupted run (its checkpoint): claiming
        one of them is a rejoin.
    rebind_grace_s : float
        How long after the SuperLink reported a holder unavailable its key may go to
        another claimant while the holder is still listed as connected.
    clock : callable
        Seconds of a monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        num_experts: int,
        known: Mapping[int, int] | None = None,
        rebind_grace_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.num_experts = num_experts
        self.members: dict[int, Member] = {}
        self._key_of: dict[Hashable, int] = {}
        self._known = {int(k): int(v) for k, v in (known or {}).items()}
        self.rebind_grace_s, self.clock = rebind_grace_s, clock

    # ---------------------------------------------------------------- claims
    def claim(
        self,
        holder: Hashable,
        key: int,
        capacity: object,
        connected: Collection[Hashable],
        num_partitions: int | None = None,
        num_examples: int | None = None,
        memory_mb: float | None = None,
    ) -> Admission:
        """Bind ``key`` to ``holder`` if the rules allow it (see the module docstring).

        ``capacity`` is checked here (an integer in [1, E]); ``connected`` holds the
        holders the federation lists as connected now; ``num_examples`` is the
        training examples the client declares (None: it declares none, and is bounded
        by the round's median rule only); ``memory_mb`` the budget behind an
        automatic capacity (checked by :func:`flexmoe_core.protocol.decode_info`).
        """
        key = int(key)
        try:
            capacity = parse_capacity(capacity, self.num_experts, source=f"client {key}")
        except ValueError as err:
            return Admission("refused", key, str(err))
        if (own := self._key_of.get(holder)) is not None and own != key:
            return Admission(
                "refused",
                key,
                f"it already holds client key {own} in this run and now claims {key}; "
                "a SuperNode keeps one client-id/partition-id for the whole run",
            )
        member = self.members.get(key)
        if member is not None and member.holder is not None and member.holder != holder:
            if member.holder in connected and not self._reported_gone(member):
                return Admission(
                    "refused",
                    key,
                    f"client key {key} is bound to node {member.holder}, which is still "
                    f"connected; node {holder} claims it too. Give every SuperNode its own "
                    "client-id or partition-id in its node config",
                    retry=True,
                )
            self._key_of.pop(member.holder, None)
        if member is None:
            status = "rejoined" if key in self._known else "joined"
            member = self.members[key] = Member(key, capacity)
        else:
            status = "kept" if member.holder == holder else "rejoined"
            member.capacity = capacity
        member.holder, member.responsive, member.unavailable_since = holder, True, None
        member.num_partitions, member.num_examples = num_partitions, num_examples
        member.memory_mb = memory_mb
        self._key_of[holder] = key
        return Admission(status, key)

    def report_capacity(
        self, key: int, capacity: object, memory_mb: float | None = None
    ) -> str | None:
        """Take a capacity (and its budget) a client reported; return an error, or None."""
        try:
            value = parse_capacity(capacity, self.num_experts, source=f"client {key}")
        except ValueError as err:
            return str(err)
        self.members[key].capacity = value
        self.members[key].memory_mb = memory_mb
        return None

    def memory_budgets(self) -> dict[int, float]:
        """Return the memory budgets (MiB) of the members that reported one, by key."""
        return {k: m.memory_mb for k, m in sorted(self.members.items()) if m.memory_mb}

    # ------------------------------------------------------------- presence
    def key_of(self, holder: Hashable) -> int | None:
        """Return the key ``holder`` holds, if any."""
        return self._key_of.get(holder)

    def holder_of(self, key: int) -> Hashable | None:
        """Return the connection holding ``key`` now, if any."""
        member = self.members.get(key)
        return None if member is None else member.holder

    def holders(self) -> set[Hashable]:
        """Return every connection that holds a key."""
        return set(self._key_of)

    def missed(self, key: int) -> None:
        """Note that ``key``'s holder did not answer: it is not sampled until it does.

        It keeps the key: a late reply is no sign that somebody else should hold it.
        """
        if key in self.members:
            self.members[key].responsive = False

    def unavailable(self, key: int) -> None:
        """Note that the SuperLink reported ``key``'s holder unavailable (gone).

        Not sampled until it answers; after ``rebind_grace_s`` another node may claim
        the key even while the holder is still listed as connected.
        """
        if (member := self.members.get(key)) is not None:
            member.responsive = False
            if member.unavailable_since is None:
                member.unavailable_since = self.clock()

    def answered(self, key: int) -> None:
        """Note that ``key``'s holder answered a message."""
        if key in self.members:
            self.members[key].responsive = True
            self.members[key].unavailable_since = None

    def _reported_gone(self, member: Member) -> bool:
        since = member.unavailable_since
        return since is not None and self.clock() - since >= self.rebind_grace_s

    def unresponsive(self) -> list[Hashable]:
        """Return the holders that missed their last message (to be asked again)."""
        return [
            m.holder for m in self.members.values() if m.holder is not None and not m.responsive
        ]

    def leave(self, connected: Collection[Hashable]) -> list[int]:
        """Release the keys whose holder is no longer connected; return those keys."""
        gone = []
        for member in self.members.values():
            if member.holder is not None and member.holder not in connected:
                self._key_of.pop(member.holder, None)
                member.holder = None
                gone.append(member.key)
        return sorted(gone)

    def available(self, connected: Collection[Hashable]) -> list[int]:
        """Return the keys that can be sampled now, in key order."""
        return sorted(
            m.key
            for m in self.members.values()
            if m.holder is not None and m.holder in connected and m.responsive
        )

    # ----------------------------------------------------------------- facts
    def capacities(self, keys: Iterable[int] | None = None) -> dict[int, int]:
        """Return the capacity of every key (or of ``keys``), in key order."""
        chosen = sorted(self.members) if keys is None else list(keys)
        return {k: self.members[k].capacity for k in chosen}

    def declared_examples(self, keys: Iterable[int]) -> dict[int, int]:
        """Return the example counts the clients ``keys`` declared (those that did)."""
        return {k: n for k in keys if (n := getattr(self.members.get(k), "num_examples", None))}

    def num_partitions(self) -> set[int]:
        """Return the partition counts the members' node configs declare."""
        return {m.num_partitions for m in self.members.values() if m.num_partitions}

    def federation_size(self) -> int | None:
        """Return the simulated federation's size, if every member declares the same."""
        counts = self.num_partitions()
        return next(iter(counts)) if len(counts) == 1 else None

    def differences(self, capacities: Mapping[int, int]) -> list[str]:
        """Say how the clients differ from an interrupted run's (``capacities`` by key)."""
        notes = []
        for key, old in sorted(capacities.items()):
            if (member := self.members.get(key)) is None:
                notes.append(f"client {key} of the interrupted run is not back (yet)")
            elif member.capacity != old:
                notes.append(
                    f"client {key} now has capacity {member.capacity} (was {old}); the "
                    "resumed run will differ from an uninterrupted one"
                )
        return notes

    def state(self) -> dict[int, int]:
        """Return the capacity of every key ever seen (for the checkpoint)."""
        return {**self._known, **{k: m.capacity for k, m in self.members.items()}}
