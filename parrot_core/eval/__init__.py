"""Evaluation on the Parrot paper's benchmarks (MMMB, multilingual MMBench), scored as VLMEvalKit does.

Needs the `eval` extra (pandas, openpyxl); `import parrot` does not import this package.
Modules: `sources` (dataset names, download), `data` (the TSV and its images), `prompt` (the
official wrapper's prompt and clean-up), `matching` (the rule-based matcher), `scoring` (exact and
circular evaluation, report_acc), `judge` (optional LLM judge), `predictions` (prediction files),
`run` (answering, resumable, batched, data-parallel), `report` (outputs), `evaluate` (all of it).
"""

from .evaluate import EvalSettings, evaluate
from .judge import LLMJudge
from .sources import COLLECTIONS, DataSource, resolve_sources

__all__ = ["COLLECTIONS", "DataSource", "EvalSettings", "LLMJudge", "evaluate", "resolve_sources"]
