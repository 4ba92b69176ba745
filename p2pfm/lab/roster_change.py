"""A scenario's roster changes: the admin signs a new roster version and hands it to one running member.

An open-network scenario (``topology = "open:N"``) keeps its roster as a
signed document (``roster.signed``, version 1, signed by ``keys/admin.key``).
A ``[[faults.roster]]`` entry signs the next version without the nodes it
``remove``s and with the ones it ``add``s, after the first node completed its
``round``, and publishes it to one running member, as an operator would with
``p2pfm roster publish``; the members pass it on. Added nodes start once it
is out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pfm.core.identity import Identity, PeerId, load_key_file, write_key_file
from p2pfm.core.records import make_roster_document
from p2pfm.net.zmq_control import publish_roster

ADMIN_KEY = "admin.key"
SIGNED_ROSTER = "roster.signed"


@dataclass
class RosterBook:
    """The scenario's admin and the roster versions it has signed."""

    out: Path
    network: str
    members: set[PeerId]
    version: int = 1

    @classmethod
    def create(cls, out: Path, network: str, members: Sequence[PeerId]) -> RosterBook:
        admin = Identity.generate()
        write_key_file(admin, out / "keys" / ADMIN_KEY)
        book = cls(out, network, set(members))
        book._sign()
        return book

    def path_of(self, version: int) -> Path:
        return self.out / (SIGNED_ROSTER if version == 1 else f"roster-v{version}.signed")

    def change(self, *, remove: Sequence[PeerId], add: Sequence[PeerId], to: str) -> int:
        """Sign the next version and publish it to the member whose hello is at ``to``; return the version."""
        self.members = (self.members - set(remove)) | set(add)
        self.version += 1
        data = self._sign()
        publish_roster(
            data, to, load_key_file(self.out / "keys" / ADMIN_KEY), self.network, roster_version=self.version
        )
        return self.version

    def _sign(self) -> bytes:
        admin = load_key_file(self.out / "keys" / ADMIN_KEY)
        document = make_roster_document(
            admin, network=self.network, version=self.version, members=self.members, admins=[admin.peer_id]
        )
        self.path_of(self.version).write_bytes(document.signed)
        return document.signed
