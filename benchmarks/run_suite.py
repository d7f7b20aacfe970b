"""Run the benchmark suite (same as ``binsparse bench``; see benchmarks/README.md).

    python benchmarks/run_suite.py --preset cpu                  # this machine, fp32
    python benchmarks/run_suite.py --preset quick --device cuda  # one GPU, bf16
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from binsparse_kernels.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
