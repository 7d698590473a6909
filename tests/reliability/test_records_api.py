"""Wait, Remove, List and Start's name/labels/timeout through a real server over mutual TLS
(grpcio): authorization, deadlines, pages cut by size, tokens, filters, errors a client can
cause (never INTERNAL or UNKNOWN)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from jobd import pki
from jobd.v1 import jobd_pb2 as pb

from ..e2e import Pki
from .harness import ServerProcess, channel, code_of

pytestmark = pytest.mark.cgroups
TIMEOUT = 60


@pytest.fixture(scope="module", autouse=True)
def more_users(hostile_pki: Pki) -> None:
    """carol and dave: users of their own, so that this module's List checks see only theirs."""
    ca = pki.load_issued(hostile_pki.dir / "ca.pem", hostile_pki.dir / "ca.key")
    for user in ("carol", "dave"):
        pki.issue_cert(ca, user, ("user",)).write(
            hostile_pki.dir / f"{user}.pem", hostile_pki.dir / f"{user}.key"
        )


def test_wait_returns_at_the_end_and_honours_the_deadline(shared_server: ServerProcess) -> None:
    with channel(shared_server) as (_, alice):
        job = alice.Start(pb.StartRequest(command=["sleep", "1000"]), timeout=TIMEOUT)
        assert code_of(lambda: alice.Wait(pb.JobRequest(id=job.id), timeout=0.5)) == (
            grpc.StatusCode.DEADLINE_EXCEEDED
        )
        alice.Stop(pb.StopRequest(id=job.id), timeout=TIMEOUT)
        ended = alice.Wait(pb.JobRequest(id=job.id), timeout=TIMEOUT)
        assert (ended.state, ended.reason, ended.signal) == (pb.STOPPED, pb.END_REASON_STOP, 15)
        short = alice.Start(
            pb.StartRequest(command=["sleep", "1000"], timeout=Duration(nanos=200_000_000)),
            timeout=TIMEOUT,
        )
        assert short.timeout.ToNanoseconds() == 200_000_000 and short.uid > 0
        ended = alice.Wait(pb.JobRequest(id=short.id), timeout=TIMEOUT)
        assert (ended.state, ended.reason) == (pb.STOPPED, pb.END_REASON_TIMEOUT)


def test_remove(shared_server: ServerProcess) -> None:
    with channel(shared_server) as (_, alice), channel(shared_server, "bob") as (_, bob):
        job = alice.Start(pb.StartRequest(command=["sleep", "1000"]), timeout=TIMEOUT)
        assert code_of(lambda: alice.Remove(pb.RemoveRequest(id=job.id), timeout=TIMEOUT)) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        assert code_of(  # another user's job is NOT_FOUND, as a missing one (issue 9)
            lambda: bob.Remove(pb.RemoveRequest(id=job.id, force=True), timeout=TIMEOUT)
        ) == grpc.StatusCode.NOT_FOUND
        gone = alice.Remove(pb.RemoveRequest(id=job.id, force=True), timeout=TIMEOUT)
        assert (gone.state, gone.reason) == (pb.STOPPED, pb.END_REASON_STOP)
        for call in (
            lambda: alice.Status(pb.JobRequest(id=job.id), timeout=TIMEOUT),
            lambda: alice.Wait(pb.JobRequest(id=job.id), timeout=TIMEOUT),
            lambda: alice.Remove(pb.RemoveRequest(id=job.id), timeout=TIMEOUT),
            lambda: alice.Output(pb.OutputRequest(id=job.id), timeout=TIMEOUT),
        ):
            assert code_of(call) == grpc.StatusCode.NOT_FOUND


def test_list_pages_are_cut_below_the_message_limit(shared_server: ServerProcess) -> None:
    """25 jobs with 200 KB command lines are 5 MB: more than one message may carry. Every page
    fits, and the pages together hold every job exactly once."""
    big = ["x" * 100_000, "y" * 100_000]
    with channel(shared_server, "carol") as (_, carol):
        ids = {
            carol.Start(pb.StartRequest(command=["true", *big], labels={"big": "1"}),
                        timeout=TIMEOUT).id
            for _ in range(25)
        }
        seen: list[str] = []
        token, pages = "", 0
        while True:
            page = carol.List(
                pb.ListRequest(page_size=1000, page_token=token, labels={"big": "1"}),
                timeout=TIMEOUT,
            )
            assert page.ByteSize() < 4 * 1024 * 1024
            seen += [j.id for j in page.jobs]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert pages >= 2 and len(seen) == len(set(seen)) and set(seen) == ids


def test_list_filters_and_who_may_list_what(shared_server: ServerProcess) -> None:
    with (
        channel(shared_server, "dave") as (_, dave),
        channel(shared_server, "admin") as (_, admin),
    ):
        a = dave.Start(pb.StartRequest(command=["true"], name="nightly", labels={"t": "a"}),
                       timeout=TIMEOUT)
        dave.Wait(pb.JobRequest(id=a.id), timeout=TIMEOUT)
        b = dave.Start(pb.StartRequest(command=["sleep", "1000"], labels={"t": "b"}),
                       timeout=TIMEOUT)
        assert code_of(
            lambda: dave.Start(pb.StartRequest(command=["true"], name="nightly"), timeout=TIMEOUT)
        ) == grpc.StatusCode.ALREADY_EXISTS

        def ids(stub: object, **kw: object) -> list[str]:
            page = stub.List(pb.ListRequest(**kw), timeout=TIMEOUT)  # type: ignore[attr-defined]
            return [j.id for j in page.jobs]

        assert ids(dave) == [b.id, a.id]
        assert ids(dave, states=[pb.RUNNING]) == [b.id]
        assert ids(dave, labels={"t": "a"}) == [a.id]
        assert ids(dave, name="nightly") == [a.id]
        assert ids(dave, id_prefix=b.id[:8]) == [b.id]
        assert ids(dave, page_size=1) == [b.id]
        assert ids(admin, owner="dave") == [b.id, a.id]
        bad = [
            (dave, pb.ListRequest(owner="alice"), grpc.StatusCode.PERMISSION_DENIED),
            (dave, pb.ListRequest(page_token="nonsense"), grpc.StatusCode.INVALID_ARGUMENT),
            (dave, pb.ListRequest(id_prefix="ab"), grpc.StatusCode.INVALID_ARGUMENT),
            (dave, pb.ListRequest(page_size=-1), grpc.StatusCode.INVALID_ARGUMENT),
            (dave, pb.ListRequest(states=[9]), grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for stub, request, code in bad:
            assert code_of(lambda s=stub, r=request: s.List(r, timeout=TIMEOUT)) == code, request
        for request in (
            pb.StartRequest(command=["true"], name="bad name"),
            pb.StartRequest(command=["true"], labels={"": "x"}),
            pb.StartRequest(command=["true"], timeout=Duration(seconds=-1)),
            pb.StartRequest(command=["true"], network=7),  # type: ignore[arg-type]
        ):
            assert code_of(lambda r=request: dave.Start(r, timeout=TIMEOUT)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            ), request
        dave.Stop(pb.StopRequest(id=b.id), timeout=TIMEOUT)
