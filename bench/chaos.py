"""Long fault campaigns: the tests/chaos suite with many more SIGKILLs per workload.

    python bench/chaos.py --kills 20            # SQLite, or DATABASE_URL=postgres://... for PostgreSQL

Prints every kill point and the pytest verdict: each job must still end completed, with
output equal to an uninterrupted run and no chunk processed twice.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs per workload (default 10)")
    args = parser.parse_args()
    env = {**os.environ, "JOBSITE_CHAOS_KILLS": str(args.kills)}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/chaos", "-m", "chaos", "-s", "-q"],
        cwd=REPO, env=env,
    )
    print(f"campaign of {args.kills} kills per workload: {'passed' if result.returncode == 0 else 'FAILED'} "
          f"in {time.monotonic() - started:.0f} s")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
