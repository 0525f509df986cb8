"""Thin wrapper: `python benchmarks/bench.py [args]` == `python -m fused_conv bench [args]`.

Uses the installed fused_conv; from an in-place build (setup.py build_ext --inplace) it falls
back to the source tree next to this file. See benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from fused_conv.bench import main
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fused_conv.bench import main

if __name__ == "__main__":
    sys.exit(main())
