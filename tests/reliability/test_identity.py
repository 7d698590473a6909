"""Identity attacks: another user's job ids on every RPC, identity smuggled in metadata, and
certificates that must not get anyone in. (Certificates from another CA, expired, not yet
valid, a server certificate as a client's and no CN are proven by tests/test_e2e.py
test_tls_refusals and test_certificate_without_cn_is_unauthenticated.)"""

from __future__ import annotations

import socket
import ssl
import uuid

import grpc
import pytest

from jobd.v1 import jobd_pb2 as pb

from .harness import ServerProcess, channel, code_of

pytestmark = pytest.mark.cgroups

# Another user's job is NOT_FOUND, as a job that does not exist: the answer tells nobody
# which ids exist (issue 9, finding 7; README "Security model").
DENIED = grpc.StatusCode.NOT_FOUND


def id_spellings(job_id: str) -> list[str]:
    """Every way of writing a UUID the server accepts: each must meet the same check."""
    u = uuid.UUID(job_id)
    return [job_id, job_id.upper(), u.hex, f"{{{job_id}}}", f"urn:uuid:{job_id}"]


def test_another_users_job_ids_on_every_rpc(shared_server: ServerProcess) -> None:
    with channel(shared_server, "alice") as (_, alice), channel(shared_server, "bob") as (_, bob):
        job = alice.Start(pb.StartRequest(command=["sh", "-c", "echo secret; exec sleep 1000"]),
                          timeout=30)
        tried = 0
        for spelling in id_spellings(job.id):
            calls = {
                "Status": lambda i=spelling: bob.Status(pb.JobRequest(id=i), timeout=30),
                "Output": lambda i=spelling: bob.Output(pb.OutputRequest(id=i), timeout=30),
                "Output follow": lambda i=spelling: bob.Output(
                    pb.OutputRequest(id=i, follow=True, offset=3), timeout=30),
                "Stop": lambda i=spelling: bob.Stop(pb.StopRequest(id=i), timeout=30),
                "Stop now": lambda i=spelling: bob.Stop(
                    pb.StopRequest(id=i, grace={"seconds": 0}), timeout=30),
            }
            for name, call in calls.items():
                assert code_of(call) == DENIED, (name, spelling)
                tried += 1
        assert tried == 25
        assert job.id not in [j.id for j in bob.List(pb.ListRequest(), timeout=30).jobs]
        # Nothing bob tried had any effect: still running, output unread by him.
        assert alice.Status(pb.JobRequest(id=job.id), timeout=30).state == pb.RUNNING
        stopped = alice.Stop(pb.StopRequest(id=job.id, grace={"seconds": 0}), timeout=30)
        assert stopped.state == pb.STOPPED
        # ...and a finished job is just as private.
        assert code_of(lambda: bob.Output(pb.OutputRequest(id=job.id), timeout=30)) == DENIED
        # ...and word for word what a job that never existed gets.
        missing = str(uuid.uuid4())
        for job_id in (job.id, missing):
            with pytest.raises(grpc.RpcError) as caught:
                bob.Status(pb.JobRequest(id=job_id), timeout=30)
            assert caught.value.details() == f"no job {job_id}"  # type: ignore[attr-defined]
    audit = shared_server.text
    assert f'user=bob method=Stop job={job.id} code=NOT_FOUND' in audit


SMUGGLED = [
    ("x-jobd-user", "alice"),
    ("user", "alice"),
    ("x-user", "admin"),
    ("x-jobd-roles", "admin"),
    ("x-forwarded-client-cert", "Subject=\"CN=admin,OU=admin\""),
    ("x-ssl-client-s-dn", "CN=admin,OU=admin"),
    ("ssl-client-subject-dn", "CN=admin,OU=admin"),
    ("authorization", "Bearer admin"),
    ("x-remote-user", "admin"),
    ("grpc-previous-rpc-attempts", "1"),
]


def test_identity_smuggled_in_metadata_is_ignored(shared_server: ServerProcess) -> None:
    with channel(shared_server, "alice") as (_, alice), channel(shared_server, "bob") as (_, bob):
        job = alice.Start(pb.StartRequest(command=["true"]), timeout=30)
        for header in SMUGGLED:
            metadata = [header]
            assert code_of(lambda m=metadata: bob.Status(  # type: ignore[misc]
                pb.JobRequest(id=job.id), metadata=m, timeout=30)) == DENIED, header
            listed = bob.List(pb.ListRequest(), metadata=metadata, timeout=30).jobs
            assert job.id not in [j.id for j in listed], header
        # All of them at once, too.
        assert code_of(lambda: bob.Stop(pb.StopRequest(id=job.id), metadata=SMUGGLED,
                                        timeout=30)) == DENIED
        mine = bob.Start(pb.StartRequest(command=["true"]), metadata=SMUGGLED, timeout=30)
        assert mine.owner == "bob"
    assert "user=alice method=List" not in shared_server.text.split(job.id, 1)[1]


def _handshake_and_read(server: ServerProcess, pair: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(server.pki.dir / "ca.pem"))
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(*server.pki.pair(pair))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            return tls.recv(1024)


@pytest.mark.parametrize("who", ["lookalike-admin", "alice-made-admin"])
def test_forged_admin_certificates_are_refused(shared_server: ServerProcess, who: str) -> None:
    """CN=admin/OU=admin from a CA that copies the real CA's name, and one signed by a real
    user's own key (with that user's certificate as intermediate): refused in TLS, before the
    server says a single HTTP/2 byte; grpcio sees UNAVAILABLE, never an answer."""
    try:
        answer = _handshake_and_read(shared_server, who)
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert answer == b""
    with channel(shared_server, who) as (_, stub):
        assert code_of(lambda: stub.List(pb.ListRequest(), timeout=30)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    assert "user=admin" not in shared_server.text
