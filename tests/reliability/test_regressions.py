"""Engine-level regression tests for what the reliability suite found (docs/RELIABILITY.md,
"Found and fixed"); the end-to-end proofs are in the other modules of this package."""

from __future__ import annotations

import uuid
from pathlib import Path

import h2.events
import h2.settings
import pytest
import trio
import trio.testing

from jobd.engine import EngineConfig, InvalidArgument, JobdError, JobManager, open_job_manager

from ..test_transport import Pki, Probe, RawClient, of, pki, probe, running

__all__ = ["pki", "probe"]  # fixtures, shared with tests/test_transport.py


@pytest.mark.cgroups
async def test_output_left_by_a_crashed_server_is_removed_at_start(
    engine_config: EngineConfig,
) -> None:
    """Found: after SIGKILL and restart, the old jobs' output files stayed in the data dir
    forever (their jobs were reaped, nobody could read or remove them)."""
    output = engine_config.data_dir / "output"
    output.mkdir(parents=True)
    stale = str(uuid.uuid4())
    for suffix in (".out", ".idx"):
        (output / f"{stale}{suffix}").write_bytes(b"old")
    async with open_job_manager(engine_config):
        assert list(output.iterdir()) == []


@pytest.mark.cgroups
async def test_a_second_engine_on_the_same_data_dir_is_refused(
    engine: JobManager, engine_config: EngineConfig, tmp_path: Path
) -> None:
    """Which makes the clean-up above safe: the data dir has one owner at a time, and the
    first one's output is untouched."""
    job = await engine.start("alice", ["echo", "mine"])
    other = EngineConfig(data_dir=engine_config.data_dir,
                         cgroup_name=engine_config.cgroup_name + "-2")
    with pytest.raises(JobdError, match="another jobd is using the data dir"):
        async with open_job_manager(other):
            pass
    assert b"".join([c.data async for c in engine.read_output(job.id, follow=True)]) == b"mine\n"


@pytest.mark.cgroups
@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["echo", "x" * 200_000], {}),  # one argument over MAX_ARG_STRLEN (128 KiB)
        (["true"], {"BIG": "x" * 200_000}),
        (["echo", *(["x" * 100_000] * 30)], {}),  # 3 MB in all, over ARG_MAX
    ],
)
async def test_arguments_too_long_for_the_kernel_are_invalid(
    engine: JobManager, argv: list[str], env: dict[str, str]
) -> None:
    """Found: execve's E2BIG escaped as an OSError, which the API answered UNKNOWN
    "internal error"; a client can cause it, so it is INVALID_ARGUMENT and creates nothing."""
    with pytest.raises(InvalidArgument, match="too long"):
        await engine.start("alice", argv, env=env)
    assert engine.list() == []


async def test_stream_ended_by_shutdown_mid_message_gets_a_status_not_a_reset(
    pki: Pki, probe: Probe
) -> None:
    """Found (SIGTERM under load): a follow ended by the shutdown while in the middle of a
    message was reset (RST_STREAM CANCEL), which grpcio reports as CANCELLED, as though the
    client had cancelled. Now the message is finished first, then UNAVAILABLE is sent. (A peer
    that reads nothing is still reset: tests/test_transport.py
    test_call_cut_mid_message_is_reset_not_given_trailers.)"""
    async with running(pki, probe) as run:
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100}
        async with RawClient.open(run.server.port, pki, settings=settings) as raw:
            raw.acknowledge = False  # the handler stalls after 100 bytes of a 1000-byte message
            stream_id = await raw.request("Stream", "3:1000")
            await raw.until(of(h2.events.DataReceived, stream_id))
            await trio.testing.wait_all_tasks_blocked()
            run.server.shutdown(grace=0)
            await trio.testing.wait_all_tasks_blocked()
            # The client reads on: the message completes, then the status follows.
            raw.acknowledge = True
            raw.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
            await raw.flush()
            trailers = await raw.trailers(stream_id)
            assert trailers["grpc-status"] == "14"
            assert not any(isinstance(e, h2.events.StreamReset) for e in raw.events)
            await raw.read_to_eof()
        with trio.fail_after(10):
            await run.stopped.wait()
