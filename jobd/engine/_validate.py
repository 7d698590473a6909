"""Checks of a Start's name, labels, timeout and command size: what a client may ask to be
recorded. Standard library only; raises the engine's InvalidArgument."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from ._errors import InvalidArgument

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
MAX_LABELS = 32
MAX_LABEL_VALUE = 256
# A job's record holds its command line: bounded, so that one record always fits in a List
# page (the message limit is 4 MiB) and 100,000 kept jobs fit in memory. The kernel's own
# limit on one argument is 128 KiB.
MAX_COMMAND_BYTES = 256 * 1024
MAX_WORKING_DIR = 4096
# A year: more is a mistake (a timeout is a float of seconds).
MAX_TIMEOUT = 366 * 86400.0


def validate_name(name: str) -> str:
    if name and not NAME.fullmatch(name):
        raise InvalidArgument(
            f"bad job name {name[:80]!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_labels(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels: at most {MAX_LABELS} per job")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                f"bad label key {key[:80]!r}: use 1-63 letters, digits, '.', '_', '/' or '-', "
                "starting with a letter or digit"
            )
        if len(value) > MAX_LABEL_VALUE or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise InvalidArgument(
                f"bad value of label {key}: at most {MAX_LABEL_VALUE} characters, no control "
                "characters"
            )
    return tuple(sorted(labels.items()))


def validate_timeout(timeout: float) -> float:
    if not math.isfinite(timeout) or timeout < 0 or timeout > MAX_TIMEOUT:
        raise InvalidArgument(
            f"timeout must be between 0 (none) and {MAX_TIMEOUT:.0f} seconds, not {timeout:g}"
        )
    return timeout


def validate_size(command: Sequence[str], working_dir: str) -> None:
    size = sum(len(arg.encode(errors="surrogateescape")) + 1 for arg in command)
    if size > MAX_COMMAND_BYTES:
        raise InvalidArgument(
            f"the command line is too long: {size} bytes, at most {MAX_COMMAND_BYTES} (pass "
            "large data through a file or stdin)"
        )
    if len(working_dir) > MAX_WORKING_DIR:
        raise InvalidArgument(f"working_dir is too long: at most {MAX_WORKING_DIR} characters")
