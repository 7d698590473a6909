"""gRPC server reflection (`grpc.reflection.v1` and `v1alpha`) on the serving port, so grpcurl
and other generic clients can list and describe what jobd serves. Describes only the files of
the services it is given and their dependencies, never whatever else the process has loaded.
Must not import jobd.engine.

    reflection = ReflectionService({"jobd.v1.JobService": jobd_pb2.DESCRIPTOR, ...})
    serve_grpc([..., *reflection.services], ...)      # v1 and v1alpha

The v1alpha messages come from the grpcio-reflection package. It ships no v1 module; v1 is the
same protocol, message for message and field for field, under another package name, so its
file descriptor is derived here from the v1alpha one (and taken from the pool instead when
something else has registered it already).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import purerpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb

__all__ = ["REFLECTION_FILES", "ReflectionService"]

_V1ALPHA = "grpc.reflection.v1alpha"
_V1 = "grpc.reflection.v1"
_V1_FILE = "grpc_reflection/v1/reflection.proto"
_SERVICE = "ServerReflection"
_NOT_FOUND, _INVALID_ARGUMENT = 5, 3  # gRPC status codes, as the protocol's ErrorResponse has


def _v1_file() -> FileDescriptor:
    """grpc.reflection.v1's file descriptor, in the default pool."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileContainingSymbol(f"{_V1}.{_SERVICE}")
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = _V1
    proto.options.Clear()
    old, new = f".{_V1ALPHA}.", f".{_V1}."
    for message in proto.message_type:
        for fld in message.field:
            if fld.type_name.startswith(old):
                fld.type_name = new + fld.type_name[len(old) :]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    return pool.Add(proto)


_V1_DESCRIPTOR = _v1_file()
# name -> the message class for each version (v1 classes built from the derived descriptor).
_MESSAGES: dict[str, dict[str, Any]] = {
    _V1ALPHA: {
        "request": v1alpha_pb.ServerReflectionRequest,
        "response": v1alpha_pb.ServerReflectionResponse,
    },
    _V1: {
        kind: message_factory.GetMessageClass(
            _V1_DESCRIPTOR.message_types_by_name[f"ServerReflection{kind.title()}"]
        )
        for kind in ("request", "response")
    },
}

REFLECTION_FILES: Mapping[str, FileDescriptor] = {
    f"{_V1}.{_SERVICE}": _V1_DESCRIPTOR,
    f"{_V1ALPHA}.{_SERVICE}": v1alpha_pb.DESCRIPTOR,
}
"""The reflection services themselves, for the `files` argument of ReflectionService."""


def _closure(files: Iterable[FileDescriptor]) -> dict[str, FileDescriptor]:
    """Each file and everything it imports, by file name."""
    found: dict[str, FileDescriptor] = {}
    todo = list(files)
    while todo:
        file = todo.pop()
        if file.name not in found:
            found[file.name] = file
            todo.extend(file.dependencies)
    return found


class ReflectionService:
    """Answers ServerReflectionInfo for `files`: service name -> the file that defines it."""

    def __init__(self, files: Mapping[str, FileDescriptor]) -> None:
        self._service_names = tuple(sorted(files))
        self._files = _closure(files.values())
        # Every symbol (package-qualified) of a described file -> that file.
        self._symbols: dict[str, FileDescriptor] = {}
        for file in self._files.values():
            prefix = f"{file.package}." if file.package else ""
            for name, message in file.message_types_by_name.items():
                self._add_message(file, prefix + name, message)
            for name in file.enum_types_by_name:
                self._symbols[prefix + name] = file
            for name in file.extensions_by_name:
                self._symbols[prefix + name] = file
            for name, service in file.services_by_name.items():
                self._symbols[prefix + name] = file
                for method in service.methods:
                    self._symbols[f"{prefix}{name}.{method.name}"] = file

    def _add_message(self, file: FileDescriptor, full_name: str, message: Any) -> None:
        self._symbols[full_name] = file
        for nested in message.nested_types:
            self._add_message(file, f"{full_name}.{nested.name}", nested)
        for enum in message.enum_types:
            self._symbols[f"{full_name}.{enum.name}"] = file
        for field in message.fields:
            self._symbols[f"{full_name}.{field.name}"] = file

    def answer(self, version: str, request: Any) -> Any:
        """The response to one request, as message classes of `version` (v1 or v1alpha)."""
        response_type = _MESSAGES[version]["response"]
        kind = request.WhichOneof("message_request")
        out = response_type(valid_host=request.host, original_request=request)
        if kind == "list_services":
            for name in self._service_names:
                out.list_services_response.service.add(name=name)
        elif kind == "file_by_filename":
            self._describe(out, self._files.get(request.file_by_filename))
        elif kind == "file_containing_symbol":
            self._describe(out, self._symbols.get(request.file_containing_symbol))
        elif kind == "file_containing_extension":
            self._describe(out, None)  # jobd's files define no extensions
        elif kind == "all_extension_numbers_of_type":
            name = request.all_extension_numbers_of_type
            if name in self._symbols:
                out.all_extension_numbers_response.base_type_name = name
            else:
                self._error(out, _NOT_FOUND, f"no type {name!r} is described here")
        else:
            self._error(out, _INVALID_ARGUMENT, "the request names no known question")
        return out

    def _describe(self, out: Any, file: FileDescriptor | None) -> None:
        """The file and every file it depends on, each a serialized FileDescriptorProto."""
        if file is None:
            self._error(out, _NOT_FOUND, "not found among the files this server describes")
            return
        for each in _closure([file]).values():
            proto = descriptor_pb2.FileDescriptorProto()
            each.CopyToProto(proto)
            out.file_descriptor_response.file_descriptor_proto.append(proto.SerializeToString())

    @staticmethod
    def _error(out: Any, code: int, message: str) -> None:
        out.error_response.error_code = code
        out.error_response.error_message = message

    def _handler(self, version: str) -> Any:
        async def ServerReflectionInfo(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                yield self.answer(version, request)

        return ServerReflectionInfo

    @property
    def services(self) -> list[purerpc.Service]:
        """The v1 and the v1alpha service."""
        out = []
        for version in (_V1, _V1ALPHA):
            service = purerpc.Service(f"{version}.{_SERVICE}")
            messages = _MESSAGES[version]
            service.add_method(
                "ServerReflectionInfo",
                self._handler(version),
                purerpc.RPCSignature(
                    purerpc.Cardinality.STREAM_STREAM, messages["request"], messages["response"]
                ),
            )
            out.append(service)
        return out
