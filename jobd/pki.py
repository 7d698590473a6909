"""jobd's PKI: a CA, server and client certificates (EC P-256), in memory or on disk, for
`jobd certs init|issue|dev`, the tests and the benchmarks. Imports only the standard library
and `cryptography`.

    ca = make_ca()
    alice = issue_cert(ca, "alice", ["user"])
    server = issue_cert(ca, "localhost", server=True)
    init_pki(Path("/etc/jobd"), ["node1.example", "10.0.0.5"])   # ca.*, server.*
    issue_client(Path("/etc/jobd"), "carol", ["admin"])           # carol.pem, carol.key
    write_dev_pki(Path("certs"))   # ca.pem/.key, server.pem/.key, alice, bob, admin
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_VALIDITY",
    "DEV_CLIENTS",
    "LEAF_VALIDITY",
    "SERVER_HOSTS",
    "Issued",
    "PkiError",
    "init_pki",
    "issue_cert",
    "issue_client",
    "load_issued",
    "make_ca",
    "write_dev_pki",
]

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=365)
# Certificates start a little in the past so that a peer whose clock is behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
SERVER_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
# Development clients: subject CN (the user) -> subject OUs (the roles).
DEV_CLIENTS: Mapping[str, tuple[str, ...]] = {
    "alice": ("user",),
    "bob": ("user",),
    "admin": ("admin",),
}


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """PKCS#8, unencrypted: protect it with file permissions."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate (mode 0644) and the key (mode 0600), each atomically."""
        _write_file(key_path, self.key_pem(), 0o600)
        _write_file(cert_path, self.cert_pem(), 0o644)


def _validity(
    not_before: dt.datetime | None, not_after: dt.datetime | None, default: dt.timedelta
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before if not_before is not None else _now() - CLOCK_SKEW
    end = not_after if not_after is not None else start + default
    if end <= start:
        raise ValueError(f"certificate would expire ({end}) before it starts ({start})")
    return start, end


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(
    common_name: str = "jobd dev CA",
    *,
    organization: str = "jobd development",
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    start, end = _validity(not_before, not_after, CA_VALIDITY)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue_cert(
    ca: Issued,
    cn: str,
    ous: Iterable[str] = (),
    *,
    server: bool = False,
    hosts: Sequence[str] = SERVER_HOSTS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A leaf certificate signed by ca, subject OU=<each of ous>, CN=cn.

    server=True: serverAuth, with `hosts` (DNS names or IP addresses) as subjectAltName.
    Otherwise clientAuth: the server reads the user from CN and the roles from the OUs.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
    if cn:  # no CN at all is allowed, for tests of certificates without an identity
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    start, end = _validity(not_before, not_after, LEAF_VALIDITY)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False
        )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def load_issued(cert_path: Path, key_path: Path) -> Issued:
    """Read a PEM certificate and its unencrypted EC private key."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: expected an EC private key, got {type(key).__name__}")
    if key.public_key() != cert.public_key():
        raise ValueError(f"{key_path} is not the key of {cert_path}")
    return Issued(cert, key)


def write_dev_pki(
    directory: Path,
    *,
    force: bool = False,
    clients: Mapping[str, Sequence[str]] = DEV_CLIENTS,
    hosts: Sequence[str] = SERVER_HOSTS,
) -> list[Path]:
    """Create in directory whatever of the development PKI is missing; return the files written.

    Files: ca.pem/ca.key, server.pem/server.key, <client>.pem/<client>.key. A certificate
    counts as present when both its files exist. Existing files are kept unless force is
    set, except that a new CA means every leaf is issued again (the old ones would not verify).
    """
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def pair(name: str) -> tuple[Path, Path]:
        return directory / f"{name}.pem", directory / f"{name}.key"

    def present(name: str) -> bool:
        return all(p.is_file() for p in pair(name))

    renew = force or not present("ca")
    if renew:
        ca = make_ca()
        ca.write(*pair("ca"))
        written += pair("ca")
    else:
        ca = load_issued(*pair("ca"))

    leaves: dict[str, tuple[str, Sequence[str], bool]] = {"server": ("localhost", (), True)}
    leaves.update({name: (name, ous, False) for name, ous in clients.items()})
    for name, (cn, ous, server) in leaves.items():
        if renew or not present(name):
            issue_cert(ca, cn, ous, server=server, hosts=hosts).write(*pair(name))
            written += pair(name)
    return written


class PkiError(ValueError):
    """A PKI directory that cannot be used as asked; the message says what to do."""


def _pair(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.pem", directory / f"{name}.key"


def _private_dir(directory: Path) -> None:
    """Create directory (mode 0700: it holds the CA key) if missing."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def init_pki(
    directory: Path, hosts: Sequence[str], *, force: bool = False, days: int = 0
) -> list[Path]:
    """A new CA (ca.pem, ca.key) and a server certificate for `hosts` (DNS names or IPs; the
    first is its CN) signed by it (server.pem, server.key). Refuses to replace an existing CA
    unless `force`: every certificate the old one signed would stop working."""
    if not hosts:
        raise PkiError("give at least one --host: the names and addresses clients dial")
    for host in hosts:
        if not host or any(c.isspace() or c in "/,\0" for c in host):
            raise PkiError(f"{host!r} is not a host name or IP address")
    ca_cert, ca_key = _pair(directory, "ca")
    if not force and (ca_cert.exists() or ca_key.exists()):
        raise PkiError(
            f"{directory} already has a CA ({ca_cert.name}); use --force to replace it "
            "(certificates it signed stop working), or `jobd certs issue` to add clients"
        )
    _private_dir(directory)
    validity = dt.timedelta(days=days) if days else None
    start = _now() - CLOCK_SKEW
    ca = make_ca(
        f"jobd CA {hosts[0]}",
        organization="jobd",
        not_after=start + (validity or CA_VALIDITY),
    )
    server = issue_cert(
        ca, hosts[0], server=True, hosts=hosts, not_after=start + (validity or LEAF_VALIDITY)
    )
    ca.write(ca_cert, ca_key)
    server.write(*_pair(directory, "server"))
    return [ca_cert, ca_key, *_pair(directory, "server")]


def issue_client(
    directory: Path,
    user: str,
    roles: Sequence[str] = ("user",),
    *,
    force: bool = False,
    days: int = 0,
) -> list[Path]:
    """<user>.pem and <user>.key: a client certificate (CN=user, an OU per role) signed by the
    CA in directory. Refuses to replace an existing one unless `force`."""
    if not user or user in ("ca", "server") or user.startswith(".") or any(
        c in user for c in "/\0\n"
    ):
        raise PkiError(f"{user!r} cannot be a user name here (nor 'ca' or 'server')")
    ca_files = _pair(directory, "ca")
    if not all(p.is_file() for p in ca_files):
        raise PkiError(f"no CA in {directory}: run `jobd certs init --dir {directory}` first")
    target = _pair(directory, user)
    if not force and any(p.exists() for p in target):
        raise PkiError(f"{target[0]} exists; use --force to issue a new one")
    ca = load_issued(*ca_files)
    not_after = _now() - CLOCK_SKEW + dt.timedelta(days=days) if days else None
    issue_cert(ca, user, roles, not_after=not_after).write(*target)
    return list(target)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace path with data atomically; the file never exists with a wider mode."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
