"""What the multi-process tests (test_ddp, test_sharding) share."""
import socket


def free_port() -> int:
    """A TCP port free on this host now, for a gloo rendezvous on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
