"""Fixtures of the reliability suite: one PKI (with the certificates attackers would try) and
one real `jobd serve` per module, for the tests that only need a server to attack."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from jobd import pki

from ..e2e import Pki
from .harness import ServerProcess, serving


@pytest.fixture(scope="session")
def hostile_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """tests/e2e.py's PKI (alice, bob, admin, expired, future, nocn, evil-admin), plus:
    `lookalike-admin`: CN=admin/OU=admin from a CA with the very same name as the real one;
    `alice-made-admin`: CN=admin/OU=admin signed by alice's own (leaf) key."""
    made = Pki.make(tmp_path_factory.mktemp("hostile-pki"))
    directory = made.dir
    real_ca = pki.load_issued(directory / "ca.pem", directory / "ca.key")
    lookalike_ca = pki.make_ca(real_ca.cert.subject.rfc4514_string().split("CN=")[1].split(",")[0])
    assert lookalike_ca.cert.subject == real_ca.cert.subject
    pki.issue_cert(lookalike_ca, "admin", ("admin",)).write(
        directory / "lookalike-admin.pem", directory / "lookalike-admin.key"
    )
    alice = pki.load_issued(directory / "alice.pem", directory / "alice.key")
    forged = pki.issue_cert(alice, "admin", ("admin",))
    # Presented with alice's certificate as the intermediate: the chain a forger would send.
    forged.write(directory / "alice-made-admin.pem", directory / "alice-made-admin.key")
    with open(directory / "alice-made-admin.pem", "ab") as chain:
        chain.write(alice.cert_pem())
    assert forged.cert.not_valid_after_utc > dt.datetime.now(dt.UTC)
    return made


@pytest.fixture(scope="module")
def shared_server(
    hostile_pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One real server for a whole module; it must end (SIGTERM) with exit 0 and nothing
    left, and must not have logged a bug."""
    with serving(hostile_pki, tmp_path_factory.mktemp("srv")) as server:
        yield server
        server.check_healthy()
