"""The committed jobd.v1 code is fresh; its names and numbers are the docs/DESIGN.md contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from jobd.v1 import jobd_pb2

ROOT = Path(__file__).resolve().parent.parent

# docs/DESIGN.md "API": message -> {field name: number}. Fields may be added, never
# renamed or renumbered, so every entry here must stay as it is.
FIELDS: dict[str, dict[str, int]] = {
    "StartRequest": {"command": 1, "env": 2, "working_dir": 3, "limits": 4},
    "Limits": {"cpus": 1, "memory_bytes": 2, "pids": 3, "io_read_bps": 4, "io_write_bps": 5},
    "StopRequest": {"id": 1, "grace": 2},
    "JobRequest": {"id": 1},
    "OutputRequest": {"id": 1, "follow": 2, "offset": 3},
    "OutputChunk": {"data": 1, "stream": 2, "offset": 3, "time": 4},
    "ListRequest": {},
    "ListResponse": {"jobs": 1},
    "Job": {
        "id": 1, "owner": 2, "command": 3, "state": 4, "exit_code": 5, "signal": 6,
        "started_at": 7, "ended_at": 8, "limits": 9, "usage": 10,
    },
    "Usage": {"cpu_usec": 1, "memory_peak_bytes": 2, "oom_kills": 3},
}  # fmt: skip

ENUMS: dict[str, dict[str, int]] = {
    "Stream": {"STREAM_UNSPECIFIED": 0, "STDOUT": 1, "STDERR": 2},
    "State": {"STATE_UNSPECIFIED": 0, "RUNNING": 1, "EXITED": 2, "STOPPED": 3, "KILLED": 4},
}

# method -> (request, response, server streaming)
METHODS: dict[str, tuple[str, str, bool]] = {
    "Start": ("StartRequest", "Job", False),
    "Stop": ("StopRequest", "Job", False),
    "Status": ("JobRequest", "Job", False),
    "Output": ("OutputRequest", "OutputChunk", True),
    "List": ("ListRequest", "ListResponse", False),
}


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_package() -> None:
    file = descriptor_pb2.FileDescriptorProto()
    jobd_pb2.DESCRIPTOR.CopyToProto(file)
    assert file.package == "jobd.v1"
    assert file.syntax == "proto3"
    assert list(file.dependency) == [
        "google/protobuf/duration.proto",
        "google/protobuf/timestamp.proto",
    ]


@pytest.mark.parametrize("message", sorted(FIELDS))
def test_message_fields(message: str) -> None:
    descriptor: Descriptor = jobd_pb2.DESCRIPTOR.message_types_by_name[message]
    numbers = {f.name: f.number for f in descriptor.fields}
    # Contract fields keep their numbers; added fields must not reuse them.
    assert {n: numbers.get(n) for n in FIELDS[message]} == FIELDS[message]


def test_field_types() -> None:
    start = jobd_pb2.StartRequest.DESCRIPTOR.fields_by_name
    assert start["command"].is_repeated
    assert start["env"].message_type.GetOptions().map_entry
    assert start["limits"].message_type.full_name == "jobd.v1.Limits"
    stop = jobd_pb2.StopRequest.DESCRIPTOR.fields_by_name
    assert stop["grace"].message_type.full_name == "google.protobuf.Duration"
    chunk = jobd_pb2.OutputChunk.DESCRIPTOR.fields_by_name
    assert chunk["data"].type == FieldDescriptor.TYPE_BYTES
    assert chunk["stream"].enum_type.full_name == "jobd.v1.Stream"
    assert chunk["time"].message_type.full_name == "google.protobuf.Timestamp"
    job = jobd_pb2.Job.DESCRIPTOR.fields_by_name
    assert job["state"].enum_type.full_name == "jobd.v1.State"
    assert job["exit_code"].type == FieldDescriptor.TYPE_INT32
    assert job["signal"].type == FieldDescriptor.TYPE_INT32
    assert job["usage"].message_type.full_name == "jobd.v1.Usage"
    assert jobd_pb2.Limits.DESCRIPTOR.fields_by_name["cpus"].type == FieldDescriptor.TYPE_DOUBLE


@pytest.mark.parametrize("enum", sorted(ENUMS))
def test_enum_values(enum: str) -> None:
    descriptor = jobd_pb2.DESCRIPTOR.enum_types_by_name[enum]
    values = {v.name: v.number for v in descriptor.values}
    assert {n: values.get(n) for n in ENUMS[enum]} == ENUMS[enum]


def test_service_methods() -> None:
    service = jobd_pb2.DESCRIPTOR.services_by_name["JobService"]
    assert service.full_name == "jobd.v1.JobService"
    for name, (request, response, server_streaming) in METHODS.items():
        method = service.methods_by_name[name]
        assert method.input_type.name == request
        assert method.output_type.name == response
        assert method.server_streaming is server_streaming
        assert method.client_streaming is False


def test_stubs_import() -> None:
    from jobd.v1 import jobd_grpc, jobd_pb2_grpc

    assert set(METHODS) <= set(vars(jobd_grpc.JobServiceServicer))
    assert hasattr(jobd_grpc, "JobServiceStub")
    assert hasattr(jobd_pb2_grpc, "JobServiceStub")
    assert hasattr(jobd_pb2_grpc, "add_JobServiceServicer_to_server")
