"""Node identities: Ed25519 keys, key files and peer ids.

A node has exactly one secret: a 32-byte Ed25519 seed kept in a key file.
Its public key *is* its peer id (printed as 64 lowercase hex digits). Later
layers derive everything else (transport keys) from this one file.

Key-file format (JSON, UTF-8, mode 0600), documented in docs/identity.md::

    {"format": "p2pfm-ed25519-v1", "seed": "<64 hex>", "public": "<64 hex>"}

``public`` is redundant on purpose: it lets us tell a corrupt file (the seed
no longer matches its public key) from a valid one.
"""

from __future__ import annotations

import json
import os
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from p2pfm.core.errors import KeyFileError, LocalProtocolError
from p2pfm.core.private_files import write_private_file

KEY_FILE_FORMAT = "p2pfm-ed25519-v1"
SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
KEY_FILE_MODE = 0o600
_MAX_KEY_FILE_BYTES = 4096  # a real key file is ~170 bytes


_INTERNED: weakref.WeakValueDictionary[bytes, PeerId] = weakref.WeakValueDictionary()


@dataclass(frozen=True, order=True)
class PeerId:
    """A peer's Ed25519 public key; hashable, printed as hex."""

    key: bytes

    def __post_init__(self) -> None:
        if len(self.key) != PUBLIC_KEY_BYTES:
            raise LocalProtocolError(f"a peer id is {PUBLIC_KEY_BYTES} bytes, got {len(self.key)}")

    def __new__(cls, key: bytes) -> PeerId:
        # One object per key while any is alive: the protocol's and the
        # transports' tables (a few lookups per message) then match peers by
        # identity, without calling __eq__. Weak: unknown keys are not kept.
        peer = _INTERNED.get(key)
        if peer is None:
            peer = super().__new__(cls)
            _INTERNED[key] = peer
        return peer

    def __reduce__(self) -> tuple[type[PeerId], tuple[bytes]]:
        return PeerId, (self.key,)

    # Hash and compare the key itself, without the generated tuple of fields.
    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerId) and self.key == other.key

    @classmethod
    def from_hex(cls, text: str) -> PeerId:
        """Parse 64 hex digits; raises ValueError with the reason."""
        try:
            key = bytes.fromhex(text.strip())
        except ValueError as exc:
            raise ValueError(f"peer id {text!r} is not hexadecimal") from exc
        if len(key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"peer id {text!r} must be {2 * PUBLIC_KEY_BYTES} hex digits")
        peer = cls(key)
        try:  # every peer needs a CurveZMQ key; small-order and off-curve points have none
            curve_public_key(peer)
        except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError, ValueError):
            raise ValueError(f"peer id {text!r} is not a usable Ed25519 public key") from None
        return peer

    @property
    def hex(self) -> str:
        return self.key.hex()

    @property
    def short(self) -> str:
        """First 10 hex digits, for logs and tables."""
        return self.key.hex()[:10]

    def __str__(self) -> str:
        return self.hex


class Identity:
    """An Ed25519 signing key and the peer id that goes with it."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise LocalProtocolError(f"an Ed25519 seed is {SEED_BYTES} bytes, got {len(seed)}")
        self._signing_key = nacl.signing.SigningKey(seed)
        self.peer_id = PeerId(bytes(self._signing_key.verify_key))

    @classmethod
    def generate(cls) -> Identity:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def seed(self) -> bytes:
        return bytes(self._signing_key)

    def curve_keypair(self) -> tuple[bytes, bytes]:
        """(public, secret) X25519 keys for CurveZMQ, derived from this Ed25519 key.

        One key file is the node's only secret: the transport key is the
        birational map of the signing key (libsodium's
        crypto_sign_ed25519_*_to_curve25519), so peers know it from the peer id.
        """
        secret = bytes(self._signing_key.to_curve25519_private_key())
        return curve_public_key(self.peer_id), secret

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte detached Ed25519 signature of ``message``."""
        return self._signing_key.sign(message).signature

    def __repr__(self) -> str:  # never print the seed
        return f"Identity(peer_id={self.peer_id.short}...)"


def curve_public_key(peer: PeerId) -> bytes:
    """The X25519 (CurveZMQ) public key that goes with a peer id."""
    return bytes(nacl.signing.VerifyKey(peer.key).to_curve25519_public_key())


def write_key_file(identity: Identity, path: Path, *, force: bool = False) -> None:
    """Write ``identity`` to ``path`` with mode 0600.

    The file is created with the final mode (no window in which it is
    readable by others). Without ``force`` an existing path (a symlink too,
    even a dangling one) is never touched; with it, the path is replaced, a
    symlink there included, and a symlink's target is never written.
    """
    body = json.dumps(
        {"format": KEY_FILE_FORMAT, "seed": identity.seed.hex(), "public": identity.peer_id.hex}
    )
    data = (body + "\n").encode("utf-8")
    try:
        if force:
            # A new file renamed over the path: opening the path itself would follow a planted symlink.
            write_private_file(path, data)
            return
        # O_EXCL fails on any existing name, a symlink included, so nothing is ever overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, KEY_FILE_MODE)
    except FileExistsError:
        raise KeyFileError(path, "already exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise KeyFileError(path, f"cannot create it ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def load_key_file(path: Path) -> Identity:
    """Read and check a key file; every problem is a one-line KeyFileError."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(path, "does not exist (create one with `p2pfm keygen --out PATH`)") from None
    except OSError as exc:
        raise KeyFileError(path, f"cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(path, "is not a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            path,
            f"is accessible by other users (mode {stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`",
        )
    if info.st_size > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(path, f"is {info.st_size} bytes, too large to be a p2pfm key file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(path, f"cannot be read as UTF-8 text ({exc})") from None
    return _parse_key_text(path, text)


def _parse_key_text(path: Path, text: str) -> Identity:
    if not text.strip():
        raise KeyFileError(path, "is empty (truncated?)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        # A key file is one JSON object; one that starts but never closes was cut short.
        stripped = text.strip()
        truncated = stripped.startswith("{") and not stripped.endswith("}")
        problem = "is truncated" if truncated else f"is not valid JSON ({exc.msg})"
        raise KeyFileError(path, problem) from None
    if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
        raise KeyFileError(path, f"is not a p2pfm key file (expected format {KEY_FILE_FORMAT!r})")
    seed_hex, public_hex = doc.get("seed"), doc.get("public")
    if not isinstance(seed_hex, str) or not isinstance(public_hex, str):
        raise KeyFileError(path, "is corrupt: 'seed' and 'public' must be hex strings")
    try:
        seed = bytes.fromhex(seed_hex)
        public = bytes.fromhex(public_hex)
    except ValueError:
        raise KeyFileError(path, "is corrupt: 'seed' or 'public' is not hexadecimal") from None
    if len(seed) != SEED_BYTES or len(public) != PUBLIC_KEY_BYTES:
        raise KeyFileError(path, "is corrupt: 'seed' and 'public' must be 32 bytes each")
    try:
        identity = Identity(seed)
    except nacl.exceptions.CryptoError as exc:  # pragma: no cover - any 32 bytes is a seed
        raise KeyFileError(path, f"is corrupt ({exc})") from None
    if identity.peer_id.key != public:
        raise KeyFileError(path, "is corrupt: the seed does not match the stored public key")
    return identity
