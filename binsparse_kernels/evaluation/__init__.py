"""Evaluation of sparse coders: metrics, LM splicing, the interpretability proxy, the report.

    binsparse eval CHECKPOINT...        # JSON + a printed table
    binsparse report RUN... --out DIR   # report.md + PNG plots
"""

from .interp import export_delphi_cache, load_delphi_cache, token_proxy
from .metrics import FiringStats, ReconstructionStats, firing_summary
from .splice import EvalResult, evaluate, reconstruct, splice

__all__ = [
    "EvalResult",
    "FiringStats",
    "ReconstructionStats",
    "evaluate",
    "export_delphi_cache",
    "firing_summary",
    "load_delphi_cache",
    "reconstruct",
    "splice",
    "token_proxy",
]
