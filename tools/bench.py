"""`just bench [--quick]`: measure jobd against the local limit and a grpcio peer, side by side.

Starts real `jobd serve` processes with fresh development certificates, prints a table of
every figure with its baseline, ratio and target, and writes it as JSON to bench-results/.
The work is in tools/benchkit/; `--worker KIND` runs one load-generating client process.
"""

from __future__ import annotations

import sys

from benchkit.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
