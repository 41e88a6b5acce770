"""Node identity, Ed25519 signatures and keyed data commitments (pure: no I/O).

A node is its Ed25519 key pair plus a 32-byte commitment secret. Its ``node_id`` (the packet
column) and its Kademlia id are both hashes of the public key, so nobody can claim an id
without holding the key that hashes to it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from qisd.errors import IdentityError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
SECRET_BYTES = 32
NODE_ID_BYTES = 16
"""Bytes of the public-key hash shown as ``node_id`` (hex, 32 characters)."""
DHT_ID_BYTES = 20
"""Kademlia ids are 160 bits."""


def node_id_for(public_key: bytes) -> str:
    """The ``node_id`` column value of a signer: hex of a short hash of its public key."""
    return hashlib.blake2b(
        public_key, digest_size=NODE_ID_BYTES, person=b"qisd-node-id"
    ).hexdigest()


def dht_id_for(public_key: bytes) -> bytes:
    """The 160-bit Kademlia id of a node: a hash of its public key."""
    return hashlib.blake2b(public_key, digest_size=DHT_ID_BYTES, person=b"qisd-dht-id").digest()


@functools.lru_cache(maxsize=4096)
def _public_key(public_key: bytes) -> Ed25519PublicKey:
    """A parsed public key; signers recur (one RPC, one page), parsing costs ~1.6 us each."""
    return Ed25519PublicKey.from_public_bytes(public_key)


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        _public_key(bytes(public_key)).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A node's signing key and commitment secret."""

    private_key: Ed25519PrivateKey = field(repr=False)
    secret: bytes = field(repr=False)
    public_key: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.secret) != SECRET_BYTES:
            raise IdentityError(f"commitment secret must be {SECRET_BYTES} bytes")
        pub = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        object.__setattr__(self, "public_key", pub)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity from the operating system's random source."""
        return cls(Ed25519PrivateKey.generate(), os.urandom(SECRET_BYTES))

    @classmethod
    def from_bytes(cls, private_key: bytes, secret: bytes) -> Identity:
        """Rebuild an identity from its 32-byte raw private key and 32-byte secret."""
        if len(private_key) != 32:
            raise IdentityError("private key must be 32 raw bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(private_key), secret)

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key (for the owner-only key file)."""
        return self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def node_id(self) -> str:
        """This node's ``node_id`` (hex)."""
        return node_id_for(self.public_key)

    @property
    def dht_id(self) -> bytes:
        """This node's 160-bit Kademlia id."""
        return dht_id_for(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature of ``message``."""
        return self.private_key.sign(message)

    def commit(self, data_ref: str) -> str:
        """Keyed commitment to a local data reference (hex).

        Keyed with the node's secret, so nobody without it can test guesses of what the
        reference was; the same reference always gives the same commitment on this node.
        """
        mac = hmac.new(self.secret, data_ref.encode("utf-8"), hashlib.blake2b)
        return mac.hexdigest()[:32]
