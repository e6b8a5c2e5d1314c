"""Entry point of ``python -m benchmarks`` (run from the repository root)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from benchmarks.cli import run_cli  # deferred so ``--help`` stays cheap to import

    return run_cli(argv)


if __name__ == "__main__":
    sys.exit(main())
