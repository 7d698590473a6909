"""A job's stdin pipe, for jobs started with stdin: fed by exactly one writer (one Input call),
closed (EOF for the job) when that writer's data ends, when the writer goes away, or when the
job ends. Imports only the standard library and trio.

    pipe = StdinPipe(job_id, proc.stdin)
    await pipe.feed(chunks)     # FailedPrecondition if fed before; returns when the data
                                # ended (EOF sent) or the job stopped reading (it ended or
                                # closed its stdin)

Buffering is bounded by the pipe (64 KiB): `send_all` blocks while the job does not read,
so the writer stops taking data from its source (for Input: HTTP/2 flow control holds the
client back).
"""

from __future__ import annotations

from collections.abc import AsyncIterable

import trio

from ._errors import FailedPrecondition


class StdinPipe:
    def __init__(self, job_id: str, stream: trio.abc.SendStream) -> None:
        self._job_id = job_id
        self._stream = stream
        self._claimed = False

    def claim(self) -> None:
        """Take the one writer's place; a second claim is refused."""
        if self._claimed:
            raise FailedPrecondition(
                f"job {self._job_id} already had its stdin from an earlier Input call: a job "
                "takes one Input call, whose end is the end of its stdin"
            )
        self._claimed = True

    async def feed(self, chunks: AsyncIterable[bytes]) -> None:
        """Write every chunk, then close the pipe. Stops early, without error, when the job no
        longer reads (it ended, or closed its stdin: EPIPE)."""
        iterator = aiter(chunks)
        try:
            async for data in iterator:
                if data:
                    await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the job is gone or closed its stdin: nothing more can reach it
        finally:
            self.close()
            aclose = getattr(iterator, "aclose", None)  # a generator stopped early
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()

    def close(self) -> None:
        """EOF for the job (idempotent); also what the job's teardown calls."""
        close = getattr(self._stream, "close", None)  # FdStream closes without awaiting
        if close is not None:
            close()
