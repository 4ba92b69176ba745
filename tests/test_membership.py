"""The sans-I/O membership state machine (p2pfm/core/membership.py), driven by a tiny in-test router."""

from __future__ import annotations

import random
from collections import Counter

import networkx as nx
import pytest

from p2pfm.core.control import encode_control
from p2pfm.core.errors import LocalProtocolError, RejectReason
from p2pfm.core.identity import Identity
from p2pfm.core.membership import Membership, MembershipConfig, Outgoing
from p2pfm.core.records import make_peer_record, make_roster_document

NET = "test-net"


class Router:
    """Delivers Outgoing messages instantly, in waves; ``down`` nodes lose what is sent to them."""

    def __init__(self, n: int, degree: int = 4, *, members: int | None = None, open_: bool = False) -> None:
        self.ids = [Identity(bytes([i % 256, i // 256]) + bytes(30)) for i in range(n)]
        self.admin = Identity(b"\xad" * 32)
        admitted = self.ids[: n if members is None else members]
        self.roster = make_roster_document(
            self.admin, network=NET, version=1, members=[i.peer_id for i in admitted],
            admins=[self.admin.peer_id], open=open_,
        )  # fmt: skip
        self.records = [make_peer_record(self.ids[i], NET, 1, [f"memory://{i}"]) for i in range(n)]
        self.config = MembershipConfig(network=NET, degree=degree, passive_size=12)
        self.nodes = [
            Membership(self.ids[i], self.config, self.roster, self.records[i], seed=i) for i in range(n)
        ]
        self.index = {self.ids[i].peer_id: i for i in range(n)}
        self.queue: list[tuple[Outgoing, int]] = []
        self.down: set[int] = set()
        self.now_s = 0.0

    def post(self, src: int, outgoing: list[Outgoing]) -> None:
        self.queue += [(o, src) for o in outgoing]

    def deliver(self, waves: int = 50) -> int:
        delivered = 0
        for _ in range(waves):
            if not self.queue:
                break
            batch, self.queue = self.queue, []
            for out, src in batch:
                dst = self.index[out.to]
                if dst in self.down or src in self.down:
                    continue
                delivered += 1
                self.post(dst, self.nodes[dst].receive(out.message, self.now_s, link=self.ids[src].peer_id))
            self.now_s += 0.01
        return delivered

    def round(self) -> None:
        self.deliver()
        for i, node in enumerate(self.nodes):
            if i not in self.down:
                self.post(i, node.round_ended(self.now_s))
        self.now_s += 1.0
        self.deliver()

    def graph(self) -> nx.Graph:
        g = nx.Graph()
        live = [i for i in range(len(self.nodes)) if i not in self.down]
        g.add_nodes_from(live)
        for i in live:
            g.add_edges_from(
                (i, self.index[p]) for p in self.nodes[i].active if self.index[p] not in self.down
            )
        return g

    def asymmetric(self) -> int:
        return sum(
            1
            for i, node in enumerate(self.nodes)
            for p in node.active
            if i not in self.down and self.ids[i].peer_id not in self.nodes[self.index[p]].active
        )

    def bootstrap(self) -> None:
        for i in range(1, len(self.nodes)):
            self.post(i, self.nodes[i].join([self.records[0]], self.now_s))
        self.round()


def test_joining_through_one_member_fills_every_active_view_with_symmetric_links() -> None:
    net = Router(64, degree=4)
    net.bootstrap()
    sizes = [len(m.active) for m in net.nodes]
    assert min(sizes) >= 4 and max(sizes) <= net.config.max_active
    assert net.asymmetric() == 0
    assert nx.is_connected(net.graph())
    assert all(len(m.passive) <= net.config.passive_size for m in net.nodes)


def test_half_the_nodes_crashing_is_repaired_from_the_passive_views() -> None:
    net = Router(64, degree=4)
    net.bootstrap()
    for _ in range(3):
        net.round()
    net.down = set(random.Random(3).sample(range(1, 64), 32))
    rounds_to_heal = None
    for r in range(1, 8):
        net.round()
        g = net.graph()
        if rounds_to_heal is None and nx.is_connected(g):
            rounds_to_heal = r
    assert rounds_to_heal is not None and rounds_to_heal <= 3
    live = [i for i in range(64) if i not in net.down]
    assert all(
        not any(net.index[p] in net.down for p in net.nodes[i].active) for i in live
    )  # the dead are gone
    assert min(len(net.nodes[i].active) for i in live) >= 2


def test_a_graceful_leave_is_heard_at_once() -> None:
    net = Router(16, degree=3)
    net.bootstrap()
    leaver = 5
    neighbours = [net.index[p] for p in net.nodes[leaver].active]
    net.post(leaver, net.nodes[leaver].leave())
    net.deliver()
    me = net.ids[leaver].peer_id
    for j in neighbours:
        assert me not in net.nodes[j].active and me not in net.nodes[j].passive
        reasons = [c.reason for c in net.nodes[j].changes if c.peer == me]
        assert reasons[-1] == "left"
    assert net.nodes[leaver].left and not net.nodes[leaver].active


def _neighbour_pair() -> tuple[Router, int, int]:
    net = Router(8, degree=3)
    net.bootstrap()
    a = 1
    b = net.index[next(iter(net.nodes[a].active))]
    return net, a, b


def test_a_replayed_disconnect_cannot_drop_an_honest_neighbour() -> None:
    net, a, b = _neighbour_pair()
    # b drops a and re-links: its disconnect is seen, then replayed by someone holding the bytes.
    message = encode_control(
        net.ids[b], kind="disconnect", network=NET, to=net.ids[a].peer_id, seq=10**6, rv=1, leave=False
    )
    assert net.nodes[a].receive(message, net.now_s, link=net.ids[b].peer_id) == []
    assert net.ids[b].peer_id not in net.nodes[a].active
    net.nodes[a].seed_views([net.records[b]], [])
    assert net.ids[b].peer_id in net.nodes[a].active
    net.nodes[a].receive(message, net.now_s, link=net.ids[b].peer_id)
    assert net.ids[b].peer_id in net.nodes[a].active
    assert net.nodes[a].refusals[RejectReason.REPLAY] == 1


def test_a_message_for_someone_else_is_refused_even_with_a_valid_signature() -> None:
    net, a, b = _neighbour_pair()
    c = next(i for i in range(8) if i not in (a, b))
    message = encode_control(
        net.ids[b], kind="disconnect", network=NET, to=net.ids[c].peer_id, seq=10**6, rv=1, leave=True
    )
    assert net.nodes[a].receive(message, net.now_s) == []
    assert net.ids[b].peer_id in net.nodes[a].active
    assert net.nodes[a].refusals[RejectReason.WRONG_RECIPIENT] == 1


def test_forged_garbage_and_mismatched_links_are_counted_never_raised() -> None:
    net, a, b = _neighbour_pair()
    node = net.nodes[a]
    before = dict(node.active)
    honest = encode_control(net.ids[b], kind="ping", network=NET, to=net.ids[a].peer_id, seq=10**6, rv=1)
    forged = bytearray(honest)
    forged[-3] ^= 0xFF
    for junk in (b"", b"P2FM", bytes(forged), b"\x00" * 500):
        assert node.receive(junk, net.now_s) == []
    c = next(i for i in range(8) if i not in (a, b))
    assert node.receive(honest, net.now_s, link=net.ids[c].peer_id) == []  # signed by b, came on c's link
    assert node.active == before
    assert node.refusals[RejectReason.SENDER_MISMATCH] == 1
    assert sum(node.refusals.values()) == 5


def test_a_key_outside_the_roster_is_refused_and_its_records_are_not_believed() -> None:
    net = Router(10, degree=3, members=8)  # nodes 8 and 9 hold keys the roster does not list
    outsider = net.nodes[8]
    net.post(8, outsider.join([net.records[0]], 0.0))
    net.deliver()
    assert net.nodes[0].refusals[RejectReason.UNKNOWN_SENDER] >= 1
    assert not outsider.active
    # A member relaying an outsider's (validly signed) record does not make it a candidate.
    net.nodes[1].passive.clear()
    hint = encode_control(
        net.ids[2], kind="join_reply", network=NET, to=net.ids[1].peer_id, seq=10**6, rv=1,
        records=[net.records[9]],
    )  # fmt: skip
    net.nodes[1].receive(hint, 0.0, link=net.ids[2].peer_id)
    assert net.ids[9].peer_id not in net.nodes[1].passive


def test_a_newer_roster_reaches_everyone_and_removes_a_member_everywhere() -> None:
    net = Router(32, degree=4)
    net.bootstrap()
    removed = net.ids[7].peer_id
    newer = make_roster_document(
        net.admin, network=NET, version=2, members=[i.peer_id for i in net.ids if i.peer_id != removed],
        admins=[net.admin.peer_id],
    )  # fmt: skip
    net.nodes[0].apply_roster(newer)  # handed to one member
    for _ in range(6):
        net.round()
    others = [m for i, m in enumerate(net.nodes) if i != 7]
    assert all(m.roster.version == 2 for m in others)
    assert all(removed not in m.active and removed not in m.passive for m in others)
    assert net.nodes[7].removed or net.nodes[7].roster.version == 1


def test_a_roster_signed_by_a_member_is_refused() -> None:
    net, a, b = _neighbour_pair()
    forged = make_roster_document(net.ids[b], network=NET, version=9, members=[], admins=[net.ids[b].peer_id])
    message = encode_control(
        net.ids[b], kind="roster", network=NET, to=net.ids[a].peer_id, seq=10**6, rv=9, document=forged.signed
    )
    net.nodes[a].receive(message, net.now_s, link=net.ids[b].peer_id)
    assert net.nodes[a].roster.version == 1
    assert net.nodes[a].refusals[RejectReason.UNKNOWN_SENDER] == 1


def test_a_silent_neighbour_is_pinged_then_dropped() -> None:
    net, a, b = _neighbour_pair()
    net.down = {b}
    node = net.nodes[a]
    node.round_ended(net.now_s)  # whatever b said before it went down counts for this round
    out = node.round_ended(net.now_s)
    assert net.ids[b].peer_id in node.active and any(
        o.kind == "ping" and o.to == net.ids[b].peer_id for o in out
    )
    node.round_ended(net.now_s + 1)
    assert net.ids[b].peer_id not in node.active
    assert Counter(c.reason for c in node.changes if c.peer == net.ids[b].peer_id)["dead"] == 1


def test_a_flood_from_one_link_is_rate_limited() -> None:
    net, a, b = _neighbour_pair()
    node = net.nodes[a]
    for seq in range(200):
        msg = encode_control(
            net.ids[b], kind="pong", network=NET, to=net.ids[a].peer_id, seq=10**6 + seq, rv=1
        )
        node.receive(msg, net.now_s + 100.0, link=net.ids[b].peer_id)  # a full bucket, no refill
    assert node.refusals[RejectReason.RATE_LIMITED] == 200 - net.config.message_burst


def test_config_is_checked() -> None:
    with pytest.raises(LocalProtocolError, match="degree"):
        MembershipConfig(network=NET, degree=0)
    with pytest.raises(LocalProtocolError, match="passive_ttl"):
        MembershipConfig(network=NET, join_ttl=1, passive_ttl=2)
    ident = Identity(bytes(32))
    roster = make_roster_document(ident, network=NET, version=1, members=[], admins=[ident.peer_id])
    other = make_peer_record(Identity(b"\x01" * 32), NET, 1, ["memory://x"])
    with pytest.raises(LocalProtocolError, match="own key"):
        Membership(ident, MembershipConfig(network=NET), roster, other, seed=0)


def test_high_priority_requests_evict_at_most_once_per_request_timeout() -> None:
    net = Router(12, degree=2)
    net.bootstrap()
    target = net.nodes[0]
    while len(target.active) < net.config.max_active:  # fill it up with seeded links
        extra = next(r for r in net.records[1:] if r.peer not in target.active)
        target.seed_views([extra], [])
    askers = [i for i in range(1, 12) if net.ids[i].peer_id not in target.active][:2]
    target.changes.clear()  # what the bootstrap did
    for k, i in enumerate(askers):
        ask = encode_control(
            net.ids[i], kind="neighbour", network=NET, to=net.ids[0].peer_id, seq=10**6 + k, rv=1,
            record=net.records[i], high=True,
        )  # fmt: skip
        target.receive(ask, 500.0, link=net.ids[i].peer_id)
    evicted = [c for c in target.changes if c.reason == "evicted"]
    assert len(evicted) == 1  # the second high request, at the same moment, found a full node
    assert net.ids[askers[0]].peer_id in target.active and net.ids[askers[1]].peer_id not in target.active
