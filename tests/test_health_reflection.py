"""Health and reflection on the serving port of a real `jobd serve`, through grpcio's own
health stub and reflection client (what grpc_health_probe and grpcurl do), with the same
mutual TLS as the job API."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from jobd.server._health import HealthService
from jobd.server._reflection import _MESSAGES

from .e2e import Pki, Server, running_server

pytestmark = pytest.mark.cgroups

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def server(tmp_path: Path, pki_dir: Pki, cgroup_name: str) -> AsyncIterator[Server]:
    async with running_server(tmp_path, pki_dir, cgroup_name) as srv:
        yield srv


def channel(server: Server, user: str = "alice", ca: str = "ca") -> grpc.Channel:
    cert, key = server.pki.pair(user)
    creds = grpc.ssl_channel_credentials(
        root_certificates=(server.pki.dir / f"{ca}.pem").read_bytes(),
        private_key=Path(key).read_bytes(),
        certificate_chain=Path(cert).read_bytes(),
    )
    return grpc.secure_channel(server.address, creds)


def code(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


# ----------------------------------------------------------------- health


def _checks(server: Server) -> dict[str, Any]:
    with channel(server) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        check = health.Check
        out: dict[str, Any] = {
            name: check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            for name in ("", "jobd.v1.JobService")
        }
        out["unknown"] = code(lambda: check(
            health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10))
        out["list"] = {
            name: each.status
            for name, each in health.List(health_pb2.HealthListRequest(), timeout=10)
            .statuses.items()
        }
        watch = health.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        out["watch_unknown"] = next(watch).status
        watch.cancel()
    return out


async def test_health_check_and_unknown_services(server: Server) -> None:
    out = await trio.to_thread.run_sync(_checks, server)
    assert out[""] == SERVING and out["jobd.v1.JobService"] == SERVING
    assert out["unknown"] == grpc.StatusCode.NOT_FOUND
    assert out["watch_unknown"] == SERVICE_UNKNOWN
    assert out["list"] == {"": SERVING, "jobd.v1.JobService": SERVING}


def _without_trusted_certificate(server: Server) -> grpc.StatusCode:
    with channel(server, user="evil-admin") as ch:
        return code(lambda: health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=10))


async def test_health_needs_a_client_certificate_the_server_trusts(server: Server) -> None:
    assert await trio.to_thread.run_sync(_without_trusted_certificate, server) == (
        grpc.StatusCode.UNAVAILABLE
    )


def _watch(server: Server, events: list[int], serving: trio.Event, token: Any) -> None:
    with channel(server) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service="jobd.v1.JobService")
        )
        try:
            for response in stream:
                events.append(response.status)
                if response.status == SERVING:
                    trio.from_thread.run_sync(serving.set, trio_token=token)
        except grpc.RpcError as exc:  # the server ends the watch once its grace is over
            events.append(exc.code())  # type: ignore[attr-defined]


async def test_watch_sees_not_serving_as_soon_as_shutdown_begins(
    tmp_path: Path, pki_dir: Pki, cgroup_name: str
) -> None:
    events: list[Any] = []
    serving = trio.Event()
    async with running_server(tmp_path, pki_dir, cgroup_name) as server:
        # A job keeps the server shutting down for its stop grace, well after the watch ends.
        await server.start_job("sh", "-c", "trap '' TERM; exec sleep 1000")
        async with trio.open_nursery() as nursery:
            token = trio.lowlevel.current_trio_token()
            nursery.start_soon(
                lambda: trio.to_thread.run_sync(_watch, server, events, serving, token)
            )
            await serving.wait()
            server.proc.send_signal(signal.SIGTERM)
        await server.proc.wait()
    assert events[:2] == [SERVING, NOT_SERVING], events
    assert events[2:] in ([], [grpc.StatusCode.UNAVAILABLE]), events


async def test_a_watcher_still_sending_when_shutdown_begins_is_told(autojump_clock: Any) -> None:
    # The race the test above met now and then, made certain: shutdown begins while the
    # watcher has yielded SERVING and not yet asked for its next message (purerpc still
    # sending it). Before the fix that watcher waited for a wake it had already missed.
    health = HealthService(["jobd.v1.JobService"])
    watch = health.Watch(health_pb2.HealthCheckRequest(service="jobd.v1.JobService"))
    assert (await anext(watch)).status == SERVING
    health.shut_down()
    with trio.fail_after(5):
        assert (await anext(watch)).status == NOT_SERVING
    assert health.status("") == NOT_SERVING
    await watch.aclose()


# ----------------------------------------------------------------- reflection


def _listing(server: Server) -> dict[str, Any]:
    """What `grpcurl list`, `grpcurl list SERVICE` and `grpcurl describe MESSAGE` show, through
    grpcio-reflection's client (v1alpha, as grpcurl falls back to)."""
    with channel(server) as ch:
        database = ProtoReflectionDescriptorDatabase(ch)
        pool = descriptor_pool.DescriptorPool(database)
        services = sorted(database.get_services())
        job_service = pool.FindServiceByName("jobd.v1.JobService")
        methods = {
            m.name: (m.input_type.full_name, m.output_type.full_name,
                     m.client_streaming, m.server_streaming)
            for m in job_service.methods
        }
        job = pool.FindMessageTypeByName("jobd.v1.Job")
        health = pool.FindServiceByName("grpc.health.v1.Health")
        return {
            "services": services,
            "methods": methods,
            "job_fields": {f.name: f.number for f in job.fields},
            "job_file_deps": sorted(d.name for d in job.file.dependencies),
            "health_methods": sorted(m.name for m in health.methods),
            "timestamp": pool.FindMessageTypeByName("google.protobuf.Timestamp").full_name,
        }


async def test_reflection_lists_and_describes_every_service(server: Server) -> None:
    out = await trio.to_thread.run_sync(_listing, server)
    assert out["services"] == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "jobd.v1.JobService",
    ]
    methods = out["methods"]
    assert set(methods) == {"Start", "Stop", "Status", "Output", "List", "Wait", "Remove",
                            "Input"}
    assert methods["Start"] == ("jobd.v1.StartRequest", "jobd.v1.Job", False, False)
    assert methods["Output"] == ("jobd.v1.OutputRequest", "jobd.v1.OutputChunk", False, True)
    assert methods["Input"] == ("jobd.v1.InputChunk", "jobd.v1.Job", True, False)
    # Field numbers are the contract: reflection shows the same ones as the proto.
    assert out["job_fields"]["id"] == 1 and out["job_fields"]["output_blocked"] == 20
    assert out["job_file_deps"] == ["google/protobuf/duration.proto",
                                    "google/protobuf/timestamp.proto"]
    assert out["health_methods"] == ["Check", "List", "Watch"]
    assert out["timestamp"] == "google.protobuf.Timestamp"


def _raw(server: Server, version: str, requests: list[dict[str, Any]]) -> list[Any]:
    """One bidi ServerReflectionInfo call of `version` with several requests on it."""
    types = _MESSAGES[version]
    with channel(server) as ch:
        call = ch.stream_stream(
            f"/{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=types["request"].SerializeToString,
            response_deserializer=types["response"].FromString,
        )
        return list(call(iter([types["request"](**r) for r in requests]), timeout=10))


def _names(response: Any) -> list[str]:
    from google.protobuf import descriptor_pb2

    out = []
    for raw in response.file_descriptor_response.file_descriptor_proto:
        out.append(descriptor_pb2.FileDescriptorProto.FromString(raw).name)
    return sorted(out)


@pytest.mark.parametrize("version", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
async def test_reflection_raw_requests_on_one_stream(server: Server, version: str) -> None:
    requests = [
        {"list_services": ""},
        {"file_containing_symbol": "jobd.v1.JobService"},
        {"file_containing_symbol": "jobd.v1.JobService.Start"},
        {"file_by_filename": "jobd/v1/jobd.proto"},
        {"file_by_filename": "google/protobuf/duration.proto"},
        {"file_containing_symbol": "no.such.Thing"},
        {"file_by_filename": "/etc/passwd"},
        # A type the process has loaded but does not serve: not described.
        {"file_containing_symbol": "google.protobuf.FileDescriptorProto"},
        {"all_extension_numbers_of_type": "jobd.v1.Job"},
        {"file_containing_extension": {"containing_type": "jobd.v1.Job", "extension_number": 9}},
        {"host": "x"},
    ]
    responses = await trio.to_thread.run_sync(_raw, server, version, requests)
    assert len(responses) == len(requests)
    listed = sorted(s.name for s in responses[0].list_services_response.service)
    assert "jobd.v1.JobService" in listed and f"{version}.ServerReflection" in listed
    jobd_files = ["google/protobuf/duration.proto", "google/protobuf/timestamp.proto",
                  "jobd/v1/jobd.proto"]
    assert _names(responses[1]) == _names(responses[2]) == _names(responses[3]) == jobd_files
    assert _names(responses[4]) == ["google/protobuf/duration.proto"]
    for i in (5, 6, 7, 9):
        assert responses[i].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0], i
    assert responses[8].all_extension_numbers_response.base_type_name == "jobd.v1.Job"
    assert responses[10].error_response.error_code == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )
    assert responses[10].valid_host == "x"
    assert type(responses[0]).DESCRIPTOR.full_name == f"{version}.ServerReflectionResponse"


def test_v1alpha_messages_are_the_packaged_ones() -> None:
    assert _MESSAGES["grpc.reflection.v1alpha"]["request"] is (
        reflection_pb2.ServerReflectionRequest
    )


def _interactive(server: Server) -> list[str]:
    """Request, wait for its answer, next request (as grpcurl does): the stream stays open
    between requests, so purerpc's and jobd's bidi path must answer each one as it comes."""
    import queue

    types = _MESSAGES["grpc.reflection.v1"]
    asks: queue.Queue[Any] = queue.Queue()

    def requests() -> Any:
        while (item := asks.get()) is not None:
            yield item

    with channel(server) as ch:
        call = ch.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=types["request"].SerializeToString,
            response_deserializer=types["response"].FromString,
        )
        responses = call(requests(), timeout=10)
        out = []
        for symbol in ("jobd.v1.JobService", "grpc.health.v1.Health", "jobd.v1.Limits"):
            asks.put(types["request"](file_containing_symbol=symbol))
            response = next(responses)
            out.append(_names(response)[-1])
        asks.put(None)
        assert list(responses) == []
    return out


async def test_reflection_answers_each_request_while_the_stream_stays_open(
    server: Server,
) -> None:
    out = await trio.to_thread.run_sync(_interactive, server)
    assert out == ["jobd/v1/jobd.proto", "grpc_health/v1/health.proto", "jobd/v1/jobd.proto"]
