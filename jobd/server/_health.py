"""`grpc.health.v1.Health` on the serving port: Check, Watch and List for "" (the server) and
each service it serves; NOT_SERVING from the moment shutdown begins. Messages from the
grpcio-health-checking package (its `health_pb2` imports only protobuf); served by purerpc.
Must not import jobd.engine.

    health = HealthService(["jobd.v1.JobService"])
    serve_grpc([job_service.service, health.service, ...], ...)
    health.shut_down()        # every status NOT_SERVING; watchers are told at once
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import purerpc
import trio
from grpc_health.v1 import health_pb2 as pb

__all__ = ["SERVICE_NAME", "HealthService"]

SERVICE_NAME = "grpc.health.v1.Health"
_Status = pb.HealthCheckResponse.ServingStatus


class HealthService:
    """The health of the server ("") and of each service in `services`, all SERVING until
    `shut_down()`. Unknown names: Check answers NOT_FOUND, Watch sends SERVICE_UNKNOWN (as the
    gRPC health protocol says) and keeps watching."""

    def __init__(self, services: Iterable[str]) -> None:
        self._names = frozenset(["", *services])
        # The only change there is: SERVING -> NOT_SERVING, once. An Event, not a ParkingLot:
        # a watcher still sending its last message when shutdown begins parks after the wake
        # and would never be told.
        self._shutting_down = trio.Event()

    @property
    def _serving(self) -> bool:
        return not self._shutting_down.is_set()

    def shut_down(self) -> None:
        """Shutdown has begun: every name is NOT_SERVING from now on."""
        self._shutting_down.set()

    def status(self, service: str) -> pb.HealthCheckResponse.ServingStatus.ValueType:
        if service not in self._names:
            return _Status.SERVICE_UNKNOWN
        return _Status.SERVING if self._serving else _Status.NOT_SERVING

    async def Check(self, request: pb.HealthCheckRequest) -> pb.HealthCheckResponse:
        status = self.status(request.service)
        if status == _Status.SERVICE_UNKNOWN:
            raise purerpc.NotFoundError(
                f"unknown service {request.service!r}: this server serves "
                + ", ".join(repr(n) for n in sorted(self._names))
            )
        return pb.HealthCheckResponse(status=status)

    async def List(self, request: pb.HealthListRequest) -> pb.HealthListResponse:
        response = pb.HealthListResponse()
        for name in sorted(self._names):
            response.statuses[name].status = self.status(name)
        return response

    async def Watch(  # a server stream: an async generator; no scope spans a yield
        self, request: pb.HealthCheckRequest
    ) -> AsyncIterator[pb.HealthCheckResponse]:
        status = self.status(request.service)
        yield pb.HealthCheckResponse(status=status)
        if status == _Status.SERVING:
            await self._shutting_down.wait()  # returns at once if it began during the yield
            yield pb.HealthCheckResponse(status=_Status.NOT_SERVING)
        await trio.sleep_forever()  # nothing changes after that; the server ends the call

    @property
    def service(self) -> purerpc.Service:
        service = purerpc.Service(SERVICE_NAME)
        service.add_method(
            "Check",
            self.Check,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY, pb.HealthCheckRequest, pb.HealthCheckResponse
            ),
        )
        service.add_method(
            "List",
            self.List,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY, pb.HealthListRequest, pb.HealthListResponse
            ),
        )
        service.add_method(
            "Watch",
            self.Watch,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM, pb.HealthCheckRequest, pb.HealthCheckResponse
            ),
        )
        return service
