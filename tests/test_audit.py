"""The audit log's formatting (jobd/server/_audit.py): no value can end a line or pass for
another field, long values are cut with a marker, timestamps are UTC ISO 8601, the rate
limit counts what it drops, and deferred lines keep their order and their events' times."""

from __future__ import annotations

import contextvars
import datetime as dt
import io
import logging

import pytest
import trio
import trio.testing

from jobd.server import _audit
from jobd.server._audit import (
    MAX_VALUE_CHARS,
    RateLimitedLog,
    UtcFormatter,
    audit_event,
    configure_logging,
    defer_audit,
    format_fields,
    quote,
    write_deferred,
)
from jobd.server._transport import _write_deferred_audit_lines


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice", "alice"),
        ("6f1c0a4e-1f0e-4c39-9a53-2d8d0f3e4b7a", "6f1c0a4e-1f0e-4c39-9a53-2d8d0f3e4b7a"),
        ("", '""'),
        ("a b", '"a b"'),
        ("x\ny", '"x\\ny"'),
        ("x\r\x1b[2K", '"x\\r\\x1b[2K"'),
        ('say "hi" \\', '"say \\"hi\\" \\\\"'),
        ("k=v", '"k=v"'),
        ("line\u2028sep\x85", '"line\\u2028sep\\x85"'),
        ("é", '"é"'),
    ],
)
def test_quote(value: str, expected: str) -> None:
    assert quote(value) == expected


def test_long_values_are_cut_with_a_marker() -> None:
    out = quote("y" * 100_000)
    assert out == '"' + "y" * MAX_VALUE_CHARS + f'...(+{100_000 - MAX_VALUE_CHARS} chars)"'


def test_fields_stay_on_one_line_whatever_they_hold() -> None:
    line = format_fields("rpc", {"user": "a\nb", "job": None, "command": ["sh", "-c", "x y"],
                                 "cpus": 0.5, "n": 3})
    assert line == 'rpc user="a\\nb" job=- command=[sh,-c,"x y"] cpus=0.5 n=3'
    long = format_fields("rpc", {"command": ["a" * 200] * 100})
    assert len(long) < 1500 and "args)" in long and "\n" not in long


def test_records_carry_the_fields_and_utc_timestamps() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logging.getLogger().addHandler(keep)
    try:
        audit_event("job-end", job="j", exit_code=3)
        logging.getLogger("hpack.hpack").debug("a frame")
    finally:
        logging.getLogger().removeHandler(keep)
    text = stream.getvalue()
    assert text.endswith(" INFO jobd.audit: job-end job=j exit_code=3\n"), text
    assert text[:24].endswith("Z") and text[10] == "T", text
    assert "frame" not in text
    assert records[0].audit_event == "job-end"  # type: ignore[attr-defined]
    assert records[0].audit_fields == {"job": "j", "exit_code": 3}  # type: ignore[attr-defined]
    assert isinstance(UtcFormatter().formatTime(records[0]), str)


def test_rate_limit_counts_what_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(per_second=1.0, burst=2, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "jobd.audit")
    logged = [limited.event("tls-refused", peer=f"p{i}") for i in range(5)]
    assert logged == [True, True, False, False, False]
    now[0] = 1.0
    assert limited.event("tls-refused", peer="p5")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[-1] == "tls-refused peer=p5 suppressed=3"


def _deferred(event: str, **fields: object) -> None:
    """audit_event as a call task of the server makes it (the transport sets defer_audit)."""
    context = contextvars.copy_context()
    context.run(defer_audit.set, True)
    context.run(audit_event, event, **fields)


def test_timestamps_are_the_records_own(caplog: pytest.LogCaptureFixture) -> None:
    formatter = UtcFormatter()
    record = logging.LogRecord("jobd.audit", logging.INFO, "", 0, "x", (), None)
    for created in (1764582000.0, 1764582000.999, 1764582001.5, 1764582000.25):
        record.created = created
        expected = dt.datetime.fromtimestamp(created, dt.UTC).isoformat(timespec="milliseconds")
        assert formatter.formatTime(record) == expected.replace("+00:00", "Z")


def test_deferred_lines_wait_keep_their_time_and_their_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 12: an RPC's line is queued and written after its response. It keeps the time
    of its event, and an event logged at once first writes what is queued: the log's order is
    always the events' order."""
    caplog.set_level(logging.INFO, "jobd.audit")
    write_deferred()
    _deferred("rpc", method="Status", n=1)
    _deferred("rpc", method="Status", n=2)
    assert [r.getMessage() for r in caplog.records] == []  # not yet written
    audit_event("job-end", job="j")  # logged at once: the queued lines go first
    _deferred("rpc", method="Stop")
    write_deferred()
    write_deferred()  # nothing left: writes nothing twice
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "rpc method=Status n=1", "rpc method=Status n=2", "job-end job=j", "rpc method=Stop"
    ]
    first, second, end, _ = caplog.records
    assert first.created <= second.created <= end.created
    assert first.audit_fields == {"method": "Status", "n": 1}  # type: ignore[attr-defined]
    assert first.audit_event == "rpc"  # type: ignore[attr-defined]


def test_deferred_lines_are_the_records_logging_makes(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: a deferred line's record is copied from one logging made (cheaper than a
    LogRecord each), and is what `makeRecord` makes, attribute for attribute but its time
    and fields; logging's settings and an operator's record factory are followed."""
    caplog.set_level(logging.INFO, "jobd.audit")
    audit = logging.getLogger("jobd.audit")
    write_deferred()
    for n in range(3):
        _deferred("rpc", method="Status", n=n)
    write_deferred()
    made = audit.makeRecord(audit.name, logging.INFO, _audit.__file__, 0, "%s", ("x",), None)
    varying = {"created", "msecs", "relativeCreated", "args", "message", "asctime"}
    varying |= {"audit_event", "audit_fields"}
    standard = {k: v for k, v in made.__dict__.items() if k not in varying}
    for n, record in enumerate(caplog.records):
        assert record.getMessage() == f"rpc method=Status n={n}"
        assert record.audit_fields == {"method": "Status", "n": n}  # type: ignore[attr-defined]
        assert set(record.__dict__) - varying == set(made.__dict__) - varying
        assert {k: record.__dict__[k] for k in standard} == standard
        assert 0 <= record.relativeCreated - caplog.records[0].relativeCreated < 60_000
    caplog.clear()
    monkeypatch.setattr(logging, "logThreads", not logging.logThreads)
    _deferred("rpc", method="Stop")
    write_deferred()
    assert caplog.records[0].thread == (  # a setting changed: as logging makes it now
        audit.makeRecord(audit.name, logging.INFO, _audit.__file__, 0, "x", (), None).thread
    )
    factory = logging.getLogRecordFactory()

    class Operators(logging.LogRecord):
        pass

    logging.setLogRecordFactory(Operators)
    try:
        _deferred("rpc", method="Wait")
        write_deferred()
    finally:
        logging.setLogRecordFactory(factory)
    assert type(caplog.records[-1]) is Operators
    assert caplog.records[-1].getMessage() == "rpc method=Wait"


async def test_deferred_lines_are_written_within_a_second_by_the_servers_timer(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """A line whose connection neither writes nor reads any more (a peer that stopped
    reading) is written by the server's timer. Only time is waited on here."""
    caplog.set_level(logging.INFO, "jobd.audit")
    _deferred("rpc", method="Status")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_write_deferred_audit_lines)
        await trio.sleep(0.5)
        assert [r.getMessage() for r in caplog.records] == []
        await trio.sleep(0.6)
        assert [r.getMessage() for r in caplog.records] == ["rpc method=Status"]
        nursery.cancel_scope.cancel()
