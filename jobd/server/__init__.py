"""The jobd server: the engine behind the jobd.v1 gRPC API, over mutual TLS.

`_transport` owns sockets, TLS, identity and purerpc's shortcomings; `_service` adapts the
engine to the API and authorizes every call; `_serve` puts them together.
"""

from ._logformat import JsonFormatter, configure_logging
from ._serve import ServerConfig, run_server
from ._service import JobService, map_errors
from ._transport import (
    GrpcServer,
    Identity,
    TransportLimits,
    current_identity,
    make_server_ssl_context,
    serve_grpc,
)

__all__ = [
    "GrpcServer",
    "Identity",
    "JobService",
    "JsonFormatter",
    "ServerConfig",
    "TransportLimits",
    "configure_logging",
    "current_identity",
    "make_server_ssl_context",
    "map_errors",
    "run_server",
    "serve_grpc",
]
