"""Regenerate jobd/v1/ (protobuf, grpcio and purerpc stubs) from proto/jobd/v1/jobd.proto.

`python tools/gen_proto.py` writes the committed files (`just proto`); `--check` only compares.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = Path("jobd/v1/jobd.proto")  # relative to PROTO_ROOT; also names the output package
# Every file protoc writes for PROTO, relative to the repository root.
GENERATED = (
    Path("jobd/v1/jobd_pb2.py"),
    Path("jobd/v1/jobd_pb2.pyi"),
    Path("jobd/v1/jobd_pb2_grpc.py"),
    Path("jobd/v1/jobd_grpc.py"),
)


def _purerpc_plugin() -> str:
    """The protoc-gen-purerpc executable installed next to this interpreter."""
    beside = Path(sys.executable).parent / "protoc-gen-purerpc"
    found = str(beside) if beside.is_file() else shutil.which("protoc-gen-purerpc")
    if found is None:
        raise SystemExit(
            "protoc-gen-purerpc not found next to the interpreter or on PATH: "
            "install the dev dependencies (`just install`)"
        )
    return found


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for PROTO into out_dir; return the paths written, relative to out_dir."""
    out = str(out_dir)
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-purerpc={_purerpc_plugin()}",
        f"--python_out={out}", f"--pyi_out={out}",
        f"--purerpc_out={out}", f"--grpc_python_out={out}",
        str(PROTO_ROOT / PROTO),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"protoc failed ({result.returncode}):\n{result.stderr}")
    written = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())
    if written != sorted(GENERATED):
        raise SystemExit(f"protoc wrote {written}, expected {sorted(GENERATED)}")
    return written


def stale_files(root: Path = ROOT) -> list[Path]:
    """Generated files under root that are missing or differ from a fresh generation."""
    with tempfile.TemporaryDirectory(prefix="jobd-proto-") as tmp:
        fresh = Path(tmp)
        generate(fresh)
        return [
            rel
            for rel in GENERATED
            if not (root / rel).is_file() or not filecmp.cmp(fresh / rel, root / rel, shallow=False)
        ]


def write(root: Path = ROOT) -> list[Path]:
    """Regenerate the committed files under root; return those that changed."""
    with tempfile.TemporaryDirectory(prefix="jobd-proto-") as tmp:
        fresh = Path(tmp)
        changed = []
        for rel in generate(fresh):
            target = root / rel
            if target.is_file() and filecmp.cmp(fresh / rel, target, shallow=False):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fresh / rel, target)
            changed.append(rel)
        return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and fail if the committed files differ",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            names = ", ".join(str(p) for p in stale)
            print(
                f"generated code is stale: {names} does not match {PROTO_ROOT.name}/{PROTO}.\n"
                "Run `just proto` (python tools/gen_proto.py) and commit the result.",
                file=sys.stderr,
            )
            return 1
        print(f"generated code in jobd/v1/ is up to date with {PROTO_ROOT.name}/{PROTO}")
        return 0
    changed = write()
    for rel in changed:
        print(f"wrote {rel}")
    if not changed:
        print("jobd/v1/ already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
