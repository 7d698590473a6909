"""Create the development PKI (dev CA, server, alice, bob, admin) in certs/ when missing.

`python tools/devcerts.py [--dir certs] [--force]`; the work is done by jobd.pki.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobd.pki import DEV_CLIENTS, SERVER_HOSTS, load_issued, write_dev_pki

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--dir", type=Path, default=ROOT / "certs", help="where to write (default: certs/)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing files with a new CA and leaves"
    )
    args = parser.parse_args(argv)
    directory: Path = args.dir
    written = write_dev_pki(directory, force=args.force)
    if not written:
        print(f"{directory}: development certificates already present (--force to replace)")
        return 0
    for path in written:
        if path.suffix == ".key":
            print(f"wrote {path} (private key, mode 0600)")
            continue
        cert = load_issued(path, path.with_suffix(".key")).cert
        until = cert.not_valid_after_utc.date().isoformat()
        print(f"wrote {path} ({cert.subject.rfc4514_string()}, valid until {until})")
    print(
        f"server names: {', '.join(SERVER_HOSTS)}; clients: {', '.join(DEV_CLIENTS)}; "
        f"all signed by {directory / 'ca.pem'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
