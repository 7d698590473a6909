"""jobd.pki and `jobd certs dev` (`just certs`): the dev PKI works in TLS 1.3 mutual auth."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobd.pki import Issued, issue_cert, load_issued, make_ca, write_dev_pki

JOBD = str(Path(sys.executable).parent / "jobd")
CLIENTS = {"alice": ["user"], "bob": ["user"], "admin": ["admin"]}
ALL = ["ca", "server", *CLIENTS]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev PKI made by the command line tool, as `just certs` does."""
    directory = tmp_path_factory.mktemp("certs")
    result = subprocess.run(
        [JOBD, "certs", "dev", "--dir", str(directory)],
        capture_output=True,
        text=True,
        check=True,
    )
    for name in ALL:
        assert f"{name}.pem" in result.stdout
    return directory


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    return ctx


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    return ctx


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> dict[str, Any]:
    """Run a TLS handshake in memory; return the client certificate as the server sees it."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, obj in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server verifies the client's certificate after the client is done.
            s.write(b"x")
            c_in.write(s_out.read())
            assert c.read(1) == b"x"
            assert s.version() == "TLSv1.3"
            peer = s.getpeercert()
            assert peer is not None
            return peer
    raise AssertionError("handshake did not finish")


def pair(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.pem", directory / f"{name}.key"


def subject(peer: dict[str, Any]) -> list[tuple[str, str]]:
    return [attr for rdn in peer["subject"] for attr in rdn]


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_mutual_tls(certs: Path, client: str, hostname: str) -> None:
    ca = certs / "ca.pem"
    server = server_context(*pair(certs, "server"), ca)
    peer = handshake(server, client_context(*pair(certs, client), ca), hostname)
    assert subject(peer) == [
        *(("organizationalUnitName", ou) for ou in CLIENTS[client]),
        ("commonName", client),
    ]


def test_client_checks_host_name(certs: Path) -> None:
    ca = certs / "ca.pem"
    server = server_context(*pair(certs, "server"), ca)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(server, client_context(*pair(certs, "alice"), ca), "example.com")


def test_names_and_usages(certs: Path) -> None:
    ca = load_issued(*pair(certs, "ca")).cert
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= dt.timedelta(days=3649)
    server = load_issued(*pair(certs, "server")).cert
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for name, ous in CLIENTS.items():
        cert = load_issued(*pair(certs, name)).cert
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [a.value for a in cns] == [name]
        units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        assert [a.value for a in units] == ous
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert dt.timedelta(days=300) < lifetime <= dt.timedelta(days=400)


def test_key_files_are_private(certs: Path) -> None:
    for name in ALL:
        cert, key = pair(certs, name)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert


def test_idempotent_and_force(tmp_path: Path) -> None:
    written = write_dev_pki(tmp_path)
    assert sorted(written) == sorted(p for name in ALL for p in pair(tmp_path, name))
    before = {p: p.read_bytes() for p in written}

    assert write_dev_pki(tmp_path) == []
    assert {p: p.read_bytes() for p in written} == before

    # A missing leaf is issued again by the existing CA; nothing else changes.
    pair(tmp_path, "bob")[0].unlink()
    assert write_dev_pki(tmp_path) == list(pair(tmp_path, "bob"))
    assert {p: p.read_bytes() for p in written if "bob" not in p.name} == {
        p: b for p, b in before.items() if "bob" not in p.name
    }
    ca = load_issued(*pair(tmp_path, "ca")).cert
    load_issued(*pair(tmp_path, "bob")).cert.verify_directly_issued_by(ca)

    assert sorted(write_dev_pki(tmp_path, force=True)) == sorted(written)
    assert all(p.read_bytes() != before[p] for p in written)


def test_cli_keeps_existing_files(tmp_path: Path) -> None:
    cli = [JOBD, "certs", "dev", "--dir", str(tmp_path)]
    subprocess.run(cli, check=True, capture_output=True)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    again = subprocess.run(cli, check=True, capture_output=True, text=True)
    assert "already present" in again.stdout
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    forced = subprocess.run([*cli, "--force"], check=True, capture_output=True, text=True)
    assert "ca.pem" in forced.stdout
    assert (tmp_path / "ca.key").read_bytes() != before[tmp_path / "ca.key"]


# In-memory PKIs for the negative cases the server's tests need.


def write(directory: Path, name: str, issued: Issued) -> tuple[Path, Path]:
    cert, key = pair(directory, name)
    issued.write(cert, key)
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    ca = make_ca()
    write(tmp_path, "ca", ca)
    server = server_context(
        *write(tmp_path, "server", issue_cert(ca, "localhost", server=True)), tmp_path / "ca.pem"
    )
    return tmp_path, server


def test_in_memory_ca(pki: tuple[Path, ssl.SSLContext]) -> None:
    directory, server = pki
    ca = load_issued(*pair(directory, "ca"))
    carol = issue_cert(ca, "carol", ["user", "ops"])
    peer = handshake(
        server, client_context(*write(directory, "carol", carol), directory / "ca.pem"), "::1"
    )
    assert subject(peer) == [
        ("organizationalUnitName", "user"),
        ("organizationalUnitName", "ops"),
        ("commonName", "carol"),
    ]


@pytest.mark.parametrize(
    ("start", "end", "reason"),
    [(-2, -1, "has expired"), (1, 2, "not yet valid")],
    ids=["expired", "not-yet-valid"],
)
def test_client_outside_validity_is_refused(
    pki: tuple[Path, ssl.SSLContext], start: int, end: int, reason: str
) -> None:
    directory, server = pki
    ca = load_issued(*pair(directory, "ca"))
    now = dt.datetime.now(dt.UTC)
    alice = issue_cert(
        ca,
        "alice",
        ["user"],
        not_before=now + dt.timedelta(days=start),
        not_after=now + dt.timedelta(days=end),
    )
    client = client_context(*write(directory, "alice", alice), directory / "ca.pem")
    with pytest.raises(ssl.SSLCertVerificationError, match=reason):
        handshake(server, client, "localhost")


def test_client_from_other_ca_is_refused(pki: tuple[Path, ssl.SSLContext]) -> None:
    directory, server = pki
    mallory = issue_cert(make_ca("untrusted CA"), "admin", ["admin"])
    client = client_context(*write(directory, "mallory", mallory), directory / "ca.pem")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(server, client, "localhost")


def test_server_cert_cannot_act_as_client(pki: tuple[Path, ssl.SSLContext]) -> None:
    directory, server = pki
    client = client_context(*pair(directory, "server"), directory / "ca.pem")
    with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
        handshake(server, client, "localhost")


def test_rejects_inverted_validity() -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(ValueError, match="expire"):
        make_ca(not_before=now, not_after=now - dt.timedelta(seconds=1))
