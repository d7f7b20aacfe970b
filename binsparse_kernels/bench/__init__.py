"""The benchmark suite: every backend and the baselines users would otherwise run, at the paper's
shapes, against the physical floor (``binsparse bench``; see benchmarks/README.md).

* ``cases``: what is timed (ops and training steps), the presets, the inputs.
* ``baselines``: eager PyTorch, ``torch.compile`` and the reference trainer's formulation.
* ``harness``: timing, memory, floors, tables and the JSON/CSV results.
"""

from .cases import Case, preset
from .harness import Options, Results, format_table, run_suite, write_results

__all__ = ["Case", "Options", "Results", "format_table", "preset", "run_suite", "write_results"]
