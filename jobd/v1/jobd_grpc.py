import purerpc
import jobd.v1.jobd_pb2 as jobd_dot_v1_dot_jobd__pb2
import google.protobuf.duration_pb2 as google_dot_protobuf_dot_duration__pb2
import google.protobuf.timestamp_pb2 as google_dot_protobuf_dot_timestamp__pb2


class JobServiceServicer(purerpc.Servicer):
    async def Start(self, input_message):
        raise NotImplementedError()

    async def Stop(self, input_message):
        raise NotImplementedError()

    async def Status(self, input_message):
        raise NotImplementedError()

    async def Output(self, input_message):
        raise NotImplementedError()

    async def List(self, input_message):
        raise NotImplementedError()

    async def Wait(self, input_message):
        raise NotImplementedError()

    async def Remove(self, input_message):
        raise NotImplementedError()

    async def Input(self, input_messages):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "jobd.v1.JobService"
        )
        service_obj.add_method(
            "Start",
            self.Start,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.StartRequest,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )
        service_obj.add_method(
            "Stop",
            self.Stop,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.StopRequest,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )
        service_obj.add_method(
            "Status",
            self.Status,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.JobRequest,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )
        service_obj.add_method(
            "Output",
            self.Output,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                jobd_dot_v1_dot_jobd__pb2.OutputRequest,
                jobd_dot_v1_dot_jobd__pb2.OutputChunk,
            )
        )
        service_obj.add_method(
            "List",
            self.List,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.ListRequest,
                jobd_dot_v1_dot_jobd__pb2.ListResponse,
            )
        )
        service_obj.add_method(
            "Wait",
            self.Wait,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.JobRequest,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )
        service_obj.add_method(
            "Remove",
            self.Remove,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.RemoveRequest,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )
        service_obj.add_method(
            "Input",
            self.Input,
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_UNARY,
                jobd_dot_v1_dot_jobd__pb2.InputChunk,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )
        return service_obj


class JobServiceStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "jobd.v1.JobService",
            channel
        )
        self.Start = self._client.get_method_stub(
            "Start",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.StartRequest,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )
        self.Stop = self._client.get_method_stub(
            "Stop",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.StopRequest,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )
        self.Status = self._client.get_method_stub(
            "Status",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.JobRequest,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )
        self.Output = self._client.get_method_stub(
            "Output",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                jobd_dot_v1_dot_jobd__pb2.OutputRequest,
                jobd_dot_v1_dot_jobd__pb2.OutputChunk,
            )
        )
        self.List = self._client.get_method_stub(
            "List",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.ListRequest,
                jobd_dot_v1_dot_jobd__pb2.ListResponse,
            )
        )
        self.Wait = self._client.get_method_stub(
            "Wait",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.JobRequest,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )
        self.Remove = self._client.get_method_stub(
            "Remove",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                jobd_dot_v1_dot_jobd__pb2.RemoveRequest,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )
        self.Input = self._client.get_method_stub(
            "Input",
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_UNARY,
                jobd_dot_v1_dot_jobd__pb2.InputChunk,
                jobd_dot_v1_dot_jobd__pb2.Job,
            )
        )