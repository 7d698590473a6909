"""`jobd certs init` and `jobd certs issue`: what they write is what a real server and a real
client use, the keys are private, and a mistake changes nothing."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from jobd import pki

from .e2e import JOBD, Pki, running_server


def jobd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([JOBD, *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "etc-jobd"
    init = jobd("certs", "init", "--dir", str(directory), "--host", "localhost",
                "--host", "127.0.0.1", "--host", "node1.example")
    assert init.returncode == 0, init.stderr
    assert "jobd serve --cert" in init.stdout
    for user, roles in (("carol", ["user"]), ("root-ops", ["admin"])):
        issued = jobd("certs", "issue", "--dir", str(directory), "--user", user,
                      *[arg for role in roles for arg in ("--role", role)])
        assert issued.returncode == 0, issued.stderr
    return directory


def test_files_modes_and_names(made: Path) -> None:
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    for name in ("ca", "server", "carol", "root-ops"):
        assert stat.S_IMODE((made / f"{name}.key").stat().st_mode) == 0o600, name
        assert stat.S_IMODE((made / f"{name}.pem").stat().st_mode) == 0o644, name
    server = x509.load_pem_x509_certificate((made / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "node1.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    ops = x509.load_pem_x509_certificate((made / "root-ops.pem").read_bytes())
    assert ops.subject.rfc4514_string() == "CN=root-ops,OU=admin"
    ca = pki.load_issued(made / "ca.pem", made / "ca.key").cert
    ops.verify_directly_issued_by(ca)


def test_mistakes_change_nothing(made: Path) -> None:
    before = {p.name: p.read_bytes() for p in made.iterdir()}
    refused = [
        jobd("certs", "init", "--dir", str(made)),  # a CA is there already
        jobd("certs", "issue", "--dir", str(made), "--user", "carol"),  # exists
        jobd("certs", "issue", "--dir", str(made), "--user", "../evil"),
        jobd("certs", "issue", "--dir", str(made), "--user", "ca"),
        jobd("certs", "issue", "--dir", str(made / "nope"), "--user", "dave"),  # no CA there
        jobd("certs", "init", "--dir", str(made / "new"), "--host", "a b"),
    ]
    for result in refused:
        assert result.returncode == 1, result
        assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
    assert "--force" in refused[0].stderr and "certs init" in refused[4].stderr
    assert {p.name: p.read_bytes() for p in made.iterdir() if p.is_file()} == before


@pytest.mark.cgroups
async def test_real_server_and_client_use_them(
    made: Path, tmp_path: Path, cgroup_name: str
) -> None:
    # The e2e helpers name files as `jobd certs` does: <dir>/server.pem, <dir>/<user>.pem.
    async with running_server(tmp_path, Pki(made), cgroup_name) as server:
        job = await server.start_job("echo", "hello", user="carol")
        status = await server.client("status", job, user="carol", check=True)
        assert status.stdout.decode().startswith("exited (code 0)")
        listed = await server.client("list", user="root-ops", check=True)
        assert job in listed.stdout.decode()  # admin by the role `certs issue` gave
        other = await server.client("status", job, user="root-ops", check=True)
        assert other.rc == 0
