"""SSH transport of ckms: a JSON-over-exec RPC server and a persistent-connection client."""

from ckms.ssh._client import Endpoint, RpcClient, parse_endpoints
from ckms.ssh._keys import (
    fingerprint,
    generate_ssh_key,
    load_or_create_host_key,
    load_private_key,
    public_key_text,
)
from ckms.ssh._limits import ConnectionLimits, RefusalBurst
from ckms.ssh._server import Principal, RpcServer

__all__ = [
    "ConnectionLimits",
    "Endpoint",
    "Principal",
    "RefusalBurst",
    "RpcClient",
    "RpcServer",
    "fingerprint",
    "generate_ssh_key",
    "load_or_create_host_key",
    "load_private_key",
    "parse_endpoints",
    "public_key_text",
]
