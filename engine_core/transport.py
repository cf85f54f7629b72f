"""ZMQ transport security and hygiene: CurveZMQ keys, socket securing, capped warnings.

Every socket that may cross hosts (front-end <-> engine core today; data-parallel engines and
disaggregated prefill/decode later) is secured here, so there is one place to review.

Key directory (`pp-engine keys DIR`, pyzmq's `zmq.auth.create_certificates`):

    DIR/server.key, DIR/server.key_secret   the pair of the side that binds (the front-end)
    DIR/client.key, DIR/client.key_secret   the pair of the side that connects (an engine)

The binding side needs `server.key_secret`; a connecting side needs `client.key_secret` and the
public `server.key`. The binding side admits (through a ZAP handler in its ZMQ context) only
clients whose public key is a `*.key` file in DIR other than `server.key`, so more client pairs
(one per remote engine host, say) can be added beside the first.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

__all__ = [
    "CLIENT_NAME",
    "SERVER_NAME",
    "CurveAuthenticator",
    "CurveKeys",
    "WarningLimiter",
    "create_keys",
    "is_loopback_host",
    "load_client_keys",
    "load_server_keys",
    "prepare_router",
    "require_keys_for_hosts",
    "require_keys_for_tcp",
    "secure_client",
    "secure_server",
]

SERVER_NAME, CLIENT_NAME = "server", "client"
NO_KEYS_HELP = ("make CurveZMQ keys once with `pp-engine keys DIR`, then pass `--zmq-keys DIR` "
                "(LLM(..., zmq_keys=DIR)); or pass `--insecure-tcp` (LLM(..., insecure_tcp=True)) "
                "to run unauthenticated and unencrypted on a network you trust")


@dataclass(frozen=True)
class CurveKeys:
    """One side's key material: its own pair, the server's public key, and (server side only)
    the client public keys it admits."""

    public: bytes
    secret: bytes
    server_public: bytes
    allowed_clients: frozenset[bytes] = frozenset()


def create_keys(directory: str, force: bool = False) -> list[str]:
    """Write a server and a client key pair into `directory` (created 0700 if missing); secret
    files get mode 0600. Refuses (FileExistsError) to overwrite existing keys unless `force`.
    Returns the paths written."""
    names = [f"{name}{suffix}" for name in (SERVER_NAME, CLIENT_NAME)
             for suffix in (".key", ".key_secret")]
    existing = [n for n in names if os.path.exists(os.path.join(directory, n))]
    if existing and not force:
        raise FileExistsError(f"{directory} already holds {', '.join(existing)}; pass --force to "
                              f"replace them (every engine then needs the new client pair)")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    old_umask = os.umask(0o077)  # no moment where a secret file is readable by others
    try:
        for name in (SERVER_NAME, CLIENT_NAME):
            for suffix in (".key", ".key_secret"):
                path = os.path.join(directory, name + suffix)
                if os.path.exists(path):
                    os.remove(path)
            zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    paths = [os.path.join(directory, n) for n in names]
    for path in paths:
        os.chmod(path, 0o600 if path.endswith("_secret") else 0o644)
    return paths


def _read_key_file(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    """The public key and, when the file holds one, the secret key in the key file `path`
    (secret: a `.key_secret` file, which must be readable by its owner only)."""
    if not os.path.isfile(path):
        raise ValueError(f"no {path}; {NO_KEYS_HELP}")
    if secret and os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path} is readable by other users; chmod 600 it")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CurveZMQ key {path}: {exc}") from None
    return public, secret_key


def _load_public(directory: str, name: str) -> bytes:
    """The public key in DIR/NAME.key. ValueError if missing or unreadable."""
    return _read_key_file(os.path.join(directory, name + ".key"), secret=False)[0]


def _load_pair(directory: str, name: str) -> tuple[bytes, bytes]:
    """The public and secret keys in DIR/NAME.key_secret. ValueError if missing, unreadable,
    readable by other users, or without a secret key."""
    path = os.path.join(directory, name + ".key_secret")
    public, secret_key = _read_key_file(path, secret=True)
    if secret_key is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret_key


def load_server_keys(directory: str) -> CurveKeys:
    """The binding side's keys and the client public keys it admits. ValueError if missing."""
    public, secret = _load_pair(directory, SERVER_NAME)
    allowed = set()
    for entry in sorted(os.listdir(directory)):
        if entry.endswith(".key") and entry != f"{SERVER_NAME}.key":
            allowed.add(_load_public(directory, entry[:-len(".key")]))
    if not allowed:
        raise ValueError(f"{directory} holds no client public key; {NO_KEYS_HELP}")
    return CurveKeys(public, secret, public, frozenset(allowed))


def load_client_keys(directory: str, name: str = CLIENT_NAME) -> CurveKeys:
    """A connecting side's pair plus the server's public key. ValueError if missing."""
    public, secret = _load_pair(directory, name)
    server_public = _load_public(directory, SERVER_NAME)
    return CurveKeys(public, secret, server_public)


def require_keys_for_tcp(transport: str, zmq_keys: str | None, insecure_tcp: bool) -> None:
    """ValueError (saying how to make keys) for a tcp transport with neither keys nor an
    explicit `insecure_tcp`, or for a key directory that cannot serve both sides."""
    if transport == "tcp" and zmq_keys is None and not insecure_tcp:
        raise ValueError(f"the tcp engine transport needs CurveZMQ keys: {NO_KEYS_HELP}")
    if transport == "tcp" and zmq_keys is not None:
        load_server_keys(zmq_keys)
        load_client_keys(zmq_keys)


def is_loopback_host(host: str) -> bool:
    """True for a name or address that only this host can reach: localhost, 127.0.0.0/8, ::1
    (brackets allowed). Any other name, and the wildcards 0.0.0.0 and ::, are not."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_keys_for_hosts(what: str, hosts: list[str], zmq_keys: str | None,
                           insecure_tcp: bool) -> None:
    """ValueError for tcp sockets (`what`, on `hosts`) that reach past this host with neither
    CurveZMQ keys nor an explicit `insecure_tcp`; loopback-only sockets may run without keys.
    With keys, the directory must serve both sides."""
    if zmq_keys is not None:
        load_server_keys(zmq_keys)
        load_client_keys(zmq_keys)
        return
    remote = [h for h in hosts if not is_loopback_host(h)]
    if remote and not insecure_tcp:
        raise ValueError(f"{what} on {remote[0]} can be reached from other hosts and needs "
                         f"CurveZMQ keys: {NO_KEYS_HELP}")


def prepare_router(socket: zmq.Socket, keys: CurveKeys | None, max_inbound_bytes: int = -1
                   ) -> None:
    """Set up (before bind) a front-end ROUTER that talks to engines: no linger, a send to a
    gone peer fails loudly, no send high-water mark (the front-end bounds what it admits), a
    peer that sends a message over `max_inbound_bytes` (-1: no limit) is disconnected, and
    CURVE server when there are keys."""
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, max_inbound_bytes)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    socket.setsockopt(zmq.SNDHWM, 0)
    secure_server(socket, keys)


def secure_server(socket: zmq.Socket, keys: CurveKeys | None) -> None:
    """Make `socket` (before bind) a CURVE server; no-op without keys. Its context must run a
    `CurveAuthenticator`, or libzmq admits any client key."""
    if keys is not None:
        socket.curve_secretkey = keys.secret
        socket.curve_publickey = keys.public
        socket.curve_server = True


def secure_client(socket: zmq.Socket, keys: CurveKeys | None) -> None:
    """Make `socket` (before connect) a CURVE client of the server in `keys`; no-op without."""
    if keys is not None:
        socket.curve_secretkey = keys.secret
        socket.curve_publickey = keys.public
        socket.curve_serverkey = keys.server_public


class CurveAuthenticator:
    """The ZAP handler of one ZMQ context: admits CURVE clients whose public key is allowed.

    `ctx` must be the (sync) context of the server sockets; for a `zmq.asyncio.Context` pass
    `zmq.Context.shadow(async_ctx.underlying)`. Start before binding; `stop()` before the
    context is terminated."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys) -> None:
        auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=self)
        self._auth: ThreadAuthenticator | None = auth  # None once stopped
        self._allowed = keys.allowed_clients

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials check (called by pyzmq with the client's z85 public key)."""
        return key in self._allowed

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


class WarningLimiter:
    """Log the first `first` warnings, then one in every `every` (with the count dropped), so a
    flood of garbage frames cannot fill the disk."""

    def __init__(self, logger: logging.Logger, first: int = 20, every: int = 1000) -> None:
        self.logger, self.first, self.every = logger, first, every
        self.count = 0

    def warning(self, message: str, *args: object) -> None:
        self.count += 1
        if self.count <= self.first:
            self.logger.warning(message, *args)
        elif self.count % self.every == 0:
            self.logger.warning(message + " (%d bad frames so far; most are not logged)",
                                *args, self.count)
