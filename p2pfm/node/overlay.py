"""The node's membership driver: runs the sans-I/O ``Membership`` against a transport and the protocol.

The node loop hands it every control message, tells it when a round ends
and who was heard; it sends what the membership answers on the transport's
control channel and, after each call, applies the active view: the gossip
protocol mixes with exactly those peers (``set_neighbours``) and the
transport sends updates to exactly them (``set_peers``). A roster change
also reaches the protocol (who an equivocation proof may accuse).

It also holds the rule by which a **joiner catches up** (``catch_up_state``):
it trains from the network's state, not from its own initial one, and takes
that state from several members at once, combined robustly, so that one
liar cannot plant a state in it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from p2pfm.core.identity import PeerId
from p2pfm.core.membership import Membership, Outgoing, ViewChange
from p2pfm.core.protocol import GossipProtocol
from p2pfm.core.records import PeerRecord
from p2pfm.core.wire import Update
from p2pfm.learn.learner import Array
from p2pfm.net.link import ControlTransport, Received


@dataclass(frozen=True)
class JoinSettings:
    """How a joiner catches up (docs/membership.md)."""

    min_sources: int = 2  # members whose states are combined (fewer only once the listening time is up)
    # Two sources must agree this closely (||a - b|| / ||(a + b) / 2||) or the joiner waits for a third,
    # whose coordinate-wise median outvotes a liar.
    agreement: float = 0.5


class Overlay:
    """Membership wired to a node's protocol and transport (module docstring)."""

    def __init__(
        self,
        membership: Membership,
        protocol: GossipProtocol,
        transport: ControlTransport,
        *,
        contacts: Sequence[PeerRecord] = (),
        join: JoinSettings | None = None,
        on_change: Callable[[ViewChange], None] | None = None,
    ) -> None:
        self.membership, self.protocol, self.transport = membership, protocol, transport
        self.contacts = tuple(contacts)
        self.join_settings = join or JoinSettings()
        self.on_change = on_change
        self.changes: Counter[str] = Counter()  # view changes by reason, for metrics
        self.send_failures = 0
        self._roster_version = membership.roster.version
        self._apply()

    @property
    def joining(self) -> bool:
        """Whether a fresh node must join first: it has contacts to join through, or no neighbour yet
        (the first member of a network waits for a second one). A node with seeded views is not joining."""
        return bool(self.contacts) or not self.membership.active

    def start(self, now_s: float) -> None:
        if self.contacts:
            self._send(self.membership.join(self.contacts, now_s))

    def on_control(self, received: Received, now_s: float) -> None:
        self._send(self.membership.receive(received.message, now_s, link=received.link))

    def heard(self, peer: PeerId | None) -> None:
        if peer is not None:
            self.membership.heard(peer)

    def stranger(self, peer: PeerId | None) -> None:
        """An update came on a link that is not (or no longer) a neighbour's: tell that peer."""
        if peer is not None and peer not in self.membership.active:
            self._send(self.membership.not_a_neighbour(peer))

    def tick(self, now_s: float) -> None:
        self._send(self.membership.tick(now_s))

    def round_ended(self, now_s: float) -> None:
        self._send(self.membership.round_ended(now_s))

    def leave(self) -> None:
        self._send(self.membership.leave())

    def known_records(self) -> list[bytes]:
        """The signed records of the active and passive views (kept on disk to rejoin from)."""
        membership = self.membership
        return [r.signed for r in (*membership.active.values(), *membership.passive.values())]

    def next_timer_s(self) -> float | None:
        return self.membership.next_timer_s()

    def _send(self, outgoing: list[Outgoing]) -> None:
        for out in outgoing:
            if not self.transport.send_control(out.to, out.address, out.message):
                self.send_failures += 1
        self._apply()

    def _apply(self) -> None:
        membership = self.membership
        for change in membership.changes:
            self.changes[change.reason] += 1
            if self.on_change is not None:
                self.on_change(change)
        membership.changes.clear()
        if membership.neighbours != self.protocol.neighbours:
            self.protocol.set_neighbours(membership.neighbours)
            self.transport.set_peers({p: r.update_address for p, r in membership.active.items()})
        if membership.roster.version != self._roster_version:
            self._roster_version = membership.roster.version
            roster = membership.roster
            self.protocol.set_members(None if roster.open else roster.members | roster.admins)
            if not roster.open:
                self.transport.admit(roster.members | roster.admins)


def catch_up_state(
    updates: Mapping[PeerId, Update], settings: JoinSettings, *, timed_out: bool
) -> tuple[int, dict[str, Array]] | None:
    """The round and state a joiner starts from, or None to keep listening.

    Takes the newest round that ``min_sources`` neighbours have sent (any
    number once ``timed_out``), and combines their states coordinate-wise by
    the median: with three or more sources one liar cannot move it outside
    the honest values; with exactly two, they must agree to within
    ``settings.agreement`` (relative), else the joiner waits for a third.
    """
    by_round: dict[int, list[Update]] = {}
    for update in updates.values():
        by_round.setdefault(update.round, []).append(update)
    for round_ in sorted(by_round, reverse=True):
        sources = by_round[round_]
        if len(sources) < settings.min_sources and not timed_out:
            continue
        state = {
            name: np.median(np.stack([np.asarray(u.tensors[name], np.float64) for u in sources]), axis=0)
            for name in sources[0].tensors
        }
        if len(sources) == 2 and not timed_out and _disagree(sources, state, settings.agreement):
            continue
        dtypes = {name: np.asarray(sources[0].tensors[name]).dtype for name in state}
        return round_, {name: value.astype(dtypes[name]) for name, value in state.items()}
    return None


def _disagree(sources: list[Update], mean: Mapping[str, Array], tolerance: float) -> bool:
    a, b = sources
    gap = sum(float(np.sum((np.asarray(a.tensors[n], np.float64) - b.tensors[n]) ** 2)) for n in mean)
    size = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in mean.values())
    return gap > (tolerance**2) * max(size, 1e-300)
