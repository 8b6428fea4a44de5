"""SSH transport of ckms: a JSON RPC server (exec per request, or frames on one ``ckms-rpc``
channel) and a persistent-connection client."""

from ckms._lazy import lazy_exports

# Each submodule loads on first use of one of its names (ckms._lazy says why).
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "_client": (
            "TIMEOUTS_BEFORE_LEAVING",
            "Endpoint",
            "RpcClient",
            "parse_endpoints",
        ),
        "_keys": (
            "fingerprint",
            "generate_ssh_key",
            "load_or_create_host_key",
            "load_private_key",
            "public_key_text",
        ),
        "_limits": (
            "ConnectionLimits",
            "RefusalBurst",
        ),
        "_server": (
            "Principal",
            "RpcServer",
        ),
    },
)
del lazy_exports
