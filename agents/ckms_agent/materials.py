"""Key material in the agent's memory: fetched, unwrapped, digest-checked, and dropped in time.

:class:`Materials` is the only place the agent holds plaintext material outside the key files:
a version enters it only after :meth:`Materials.fetch` unwrapped it with this host's wrapping
key and its digest (keyed with the fleet's digest key) matched every digest the controller
named (sync reply, fetch reply, triggering event). It lets a keyring be rewritten without the
controller when a version is revoked (:meth:`Materials.local` falls back to the keyring file
itself, digest-checked). Material never appears in reprs, logs or errors, and a version's
material is dropped as soon as the version is revoked or removed.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable, Sequence

from ckms.crypto import InstallFormat, is_keyed_digest, material_digest, unwrap_for_agent
from ckms.errors import IntegrityError, ProtocolError
from ckms.protocol import DesiredVersion, FetchReply, FetchRequest
from ckms_agent.installer import read_keyring
from ckms_agent.state import KeyRecord, VersionRecord

__all__ = ["Fetcher", "Materials"]

log = logging.getLogger(__name__)

Fetcher = Callable[[FetchRequest], Awaitable[FetchReply]]
"""Sends one ``fetch`` on the open connection (raises TransportError when it is down)."""


class Materials:
    """Verified material by (key, version), with the digest it was checked against."""

    def __init__(self, *, wrapping_key: bytes, host_id: str, digest_key: bytes | None) -> None:
        self._wrapping = wrapping_key
        self._host = host_id
        self.digest_key = digest_key
        """The fleet's digest key; None until a host enrolled before keyed digests asked for it
        (until then nothing fetched can be checked, so nothing is installed)."""
        self._held: dict[tuple[str, int], tuple[str, bytes]] = {}

    def __repr__(self) -> str:
        return f"Materials({len(self._held)} versions)"

    def digest(self, material: bytes) -> str:
        """The keyed digest of ``material``, as the controller names it."""
        if self.digest_key is None:
            raise IntegrityError("no digest key yet: cannot check material before installing it")
        return material_digest(self.digest_key, material)

    def get(self, name: str, version: int, digest: str) -> bytes | None:
        """The material of one version if it is held and has that digest."""
        held = self._held.get((name, version))
        return held[1] if held is not None and held[0] == digest else None

    def has(self, name: str, version: int, digest: str | None = None) -> bool:
        """True when the version is held (with ``digest``, when one is given)."""
        held = self._held.get((name, version))
        return held is not None and (digest is None or held[0] == digest)

    def drop(self, name: str, version: int) -> None:
        """Forget one version's material (revoked, removed or no longer listed)."""
        self._held.pop((name, version), None)

    def forget(self, name: str) -> None:
        """Forget every version of a key."""
        for held in [k for k in self._held if k[0] == name]:
            del self._held[held]

    def clear(self) -> None:
        """Forget everything (the host was revoked)."""
        self._held.clear()

    async def fetch(
        self,
        fetch: Fetcher,
        name: str,
        desired: DesiredVersion,
        event_digest: str | None = None,
    ) -> None:
        """Fetch one version, unwrap it, and keep it only if it matches every digest named.

        ``event_digest`` is the digest the triggering event named, if any.
        """
        reply = await fetch(FetchRequest(key=name, version=desired.version))
        if reply.key != name or reply.version != desired.version:
            raise ProtocolError(
                f"fetch of {name} v{desired.version} was answered for {reply.key} v{reply.version}"
            )
        try:
            blob = base64.b64decode(reply.wrapped, validate=True)
        except (binascii.Error, ValueError):
            raise IntegrityError(
                f"wrapped material of {name} v{desired.version} is not base64"
            ) from None
        material = unwrap_for_agent(
            self._wrapping,
            blob,
            key_name=name,
            version=desired.version,
            agent_id=self._host,
        )
        digest = self.digest(material)
        expected = {desired.digest, reply.digest}
        if event_digest is not None and is_keyed_digest(event_digest):
            # An event from before digests were keyed names a plain hash: not comparable.
            expected.add(event_digest)
        if expected != {digest}:
            raise IntegrityError(
                f"material fetched for {name} v{desired.version} does not match the digest the "
                "controller named; refusing to install it"
            )
        self._held[(name, desired.version)] = (digest, material)
        log.info(
            "fetched key=%s version=%d digest=%s host=%s",
            name,
            desired.version,
            digest,
            self._host,
        )

    def local(
        self,
        record: KeyRecord,
        versions: Sequence[VersionRecord],
        read: Callable[..., bytes | None],
    ) -> dict[int, bytes] | None:
        """Material of ``versions`` from memory or the keyring file itself, digest-checked.

        None when any one is not at hand (the caller then fails closed). ``read`` reads a key
        file the way the installer does (following no link).
        """
        out: dict[int, bytes] = {}
        ring: dict[int, bytes] | None = None
        for v in versions:
            held = self.get(record.name, v.version, v.digest)
            if held is not None:
                out[v.version] = held
                continue
            if record.spec.format is InstallFormat.KEYRING_JSON and ring is None:
                ring = read_keyring(record.paths, read)
            material = (ring or {}).get(v.version)
            if material is None or self.digest(material) != v.digest:
                return None
            out[v.version] = material
        return out
