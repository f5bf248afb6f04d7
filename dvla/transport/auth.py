"""Shared-secret authentication and TLS for data-plane connections.

Both ends prove they hold the secret without sending it: each side sends a fresh random
nonce in its HELLO, then an HMAC-SHA256 over both nonces under a role label. The client
proves first; the server answers only an authenticated client, so the server never
computes a proof for a stranger. The secret comes from the config or an environment
variable and is never logged or put in a repr.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import ssl
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from dvla.errors import ConfigError

SECRET_ENV = "DVLA_SECRET"
NONCE_BYTES = 32
MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class Secret:
    """The shared secret; its repr hides the value so it cannot leak into logs."""

    value: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.value) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"data-plane secret is {len(self.value)} bytes; use at least {MIN_SECRET_BYTES}"
            )

    def __repr__(self) -> str:
        return "Secret(***)"

    @staticmethod
    def generate() -> Secret:
        """A fresh random secret, for a run whose processes all start from one parent."""
        return Secret(secrets.token_hex(32).encode())

    @staticmethod
    def resolve(configured: str | None, env: str = SECRET_ENV) -> Secret:
        """The secret from the config, else from the environment variable ``env``.

        Raises:
            ConfigError: neither is set.
        """
        value = configured if configured is not None else os.environ.get(env)
        if not value:
            raise ConfigError(
                f"no data-plane secret: set data_plane.secret or the {env} environment variable"
            )
        return Secret(value.encode())


def new_nonce() -> bytes:
    """A fresh challenge; never reused, so a recorded proof is worthless later."""
    return secrets.token_bytes(NONCE_BYTES)


def proof(secret: Secret, role: str, own_nonce: bytes, peer_nonce: bytes) -> bytes:
    """HMAC-SHA256 of ``dvla/1 <role>`` and both nonces under the secret.

    The role label keeps a client's proof from being replayed as a server's.
    """
    msg = f"dvla/1 {role}".encode() + b"\x00" + own_nonce + peer_nonce
    return hmac.new(secret.value, msg, hashlib.sha256).digest()


def verify(secret: Secret, role: str, peer_nonce: bytes, own_nonce: bytes, got: bytes) -> bool:
    """Whether ``got`` is the peer's valid proof (constant-time comparison)."""
    return hmac.compare_digest(proof(secret, role, peer_nonce, own_nonce), got)


@cache
def host_id() -> str:
    """An identifier of this machine (and boot), used to detect a same-host peer."""
    parts = [socket.gethostname()]
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            parts.append(Path(path).read_text().strip())
        except OSError:
            continue
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TlsFiles:
    """Certificate files for TLS between hosts (both ends verify each other)."""

    cert: str
    key: str
    ca: str

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.create_default_context(purpose, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(
                f"data_plane.tls: cannot load {self.cert} / {self.key}: {err}"
            ) from None
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """Requires a client certificate signed by ``ca``."""
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server's certificate against ``ca`` (hostname checked)."""
        ctx = self._context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = True
        return ctx
