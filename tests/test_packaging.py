"""The wheel, as a user gets it: built from a clean clone of this repository's committed HEAD,
installed with pip into an empty venv, and its two commands work there.

Offline: the wheel's dependencies come from a wheelhouse this test packs from the
distributions installed in the running venv (their own files, as pip installed them), and
pip is run with --no-index. So the test needs no network, and it proves pip resolves every
dependency jobd declares (a missing one fails the install or the commands)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _run(*argv: str | Path) -> str:
    """Run in /, outside the checkout, so that `python -c` cannot import jobd from there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBD_", "PIP_"))}
    env["PIP_CONFIG_FILE"] = os.devnull  # the machine's pip config may add indexes
    done = subprocess.run(
        [str(a) for a in argv], cwd="/", env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{argv}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _closure(name: str) -> list[metadata.Distribution]:
    """The installed distribution `name` and everything it needs (no extras)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [name]
    while todo:
        dist = metadata.distribution(todo.pop())
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in seen:
            continue
        seen[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _repack(dist: metadata.Distribution, into: Path) -> Path:
    """A wheel of an installed distribution, from the files its RECORD lists. Files outside
    site-packages (console scripts, which pip writes anew from entry_points.txt) are left out."""
    info = Path(str(dist._path))  # type: ignore[attr-defined]  # its .dist-info directory
    site = info.parent
    tags = [line.split(":", 1)[1].strip() for line in (info / "WHEEL").read_text().splitlines()
            if line.startswith("Tag:")]  # fmt: skip
    # py2-none-any + py3-none-any -> py2.py3-none-any (the compressed tag set of PEP 425).
    parts = [sorted({tag.split("-")[i] for tag in tags}) for i in range(3)]
    tag = "-".join(".".join(p) for p in parts)
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    wheel = into / f"{name}-{dist.version}-{tag}.whl"
    record_name = f"{info.name}/RECORD"
    rows = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for row in csv.reader(io.StringIO((info / "RECORD").read_text())):
            rel = row[0]
            skip = rel.startswith("..") or "__pycache__" in rel or rel == record_name
            skip = skip or rel.endswith(("/INSTALLER", "/REQUESTED", "/direct_url.json"))
            if skip or not (site / rel).is_file():
                continue
            data = (site / rel).read_bytes()
            zf.writestr(rel, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            rows.append([rel, f"sha256={digest.decode()}", str(len(data))])
        out = io.StringIO()
        csv.writer(out).writerows([*rows, [record_name, "", ""]])
        zf.writestr(record_name, out.getvalue())
    return wheel


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to clone the repository")
def test_wheel_from_a_clean_clone_installs_into_an_empty_venv(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    _run("git", "clone", "--quiet", "--no-hardlinks", ROOT, clone)  # committed HEAD only
    dist = tmp_path / "dist"
    # No build isolation: setuptools comes from this venv, not from an index.
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", dist, clone)  # fmt: skip
    [wheel] = dist.glob("jobd-*.whl")
    top = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    name, version = wheel.name.split("-")[:2]
    assert top == {"jobd", "jobd_client", f"{name}-{version}.dist-info"}, top

    house = tmp_path / "wheelhouse"
    house.mkdir()
    for each in _closure("jobd"):
        if each.metadata["Name"] != "jobd":
            _repack(each, house)

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    # This venv's pip installs into the empty one (--python), offline.
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install",
         "--quiet", "--no-index", "--find-links", house, wheel)  # fmt: skip
    bin_ = venv / "bin"
    assert "Usage: jobd" in _run(bin_ / "jobd", "--help")
    assert "serve" in _run(bin_ / "jobd", "--help")
    from jobd import __version__

    assert _run(bin_ / "jobd", "--version").strip() == f"jobd {__version__}"
    assert "--metrics-listen" in _run(bin_ / "jobd", "serve", "--help")
    assert "Usage: jobd-client" in _run(bin_ / "jobd-client", "--help")
    out = _run(bin_ / "jobd", "certs", "init", "--dir", tmp_path / "pki", "--host", "n1")
    assert "wrote" in out and (tmp_path / "pki" / "server.key").is_file()
    # The installed package is the one that runs, not this checkout.
    where = _run(bin_ / "python", "-c", "import jobd, jobd.server; print(jobd.__file__)")
    assert where.startswith(str(venv)), where
    missing = subprocess.run([bin_ / "python", "-c", "import client"], cwd=tmp_path,
                             capture_output=True, check=False)  # fmt: skip
    assert missing.returncode != 0  # no top-level `client` package
