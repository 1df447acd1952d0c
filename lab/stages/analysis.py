"""Analysis: look inside trained models, training nothing. The kinds live in `lab/analysis/`.

    lab stage=analysis analysis=layers init_from=<run id> analysis.runs=[<a later run id>]

The analysis run is tagged with the runs it analysed (`lab.analysis.runs`), and its tables and
figures are logged under `analysis/`.
"""
from __future__ import annotations

from typing import Optional

from lab.analysis import KINDS
from lab.analysis.inputs import Report, resolve_sources
from lab.run import Run


def analysis(run: Run) -> Optional[float]:
    """Resolve the checkpoints, run the kind, log its files and metrics. Returns the kind's headline number."""
    kind = run.cfg.analysis.kind
    sources = resolve_sources(run)
    run.tracker.set_tags({"lab.analysis.kind": kind,
                          "lab.analysis.runs": ",".join(s.run_id or s.spec for s in sources)})
    report = Report(run.info.output_dir / "analysis")
    value = KINDS[kind](run, sources, report)
    run.tracker.log_artifacts(report.directory, "analysis")
    run.tracker.log_metrics(report.metrics, step=0)
    run.say(f"wrote {', '.join(report.files())} under {report.directory}")
    return value


def run_name(cfg) -> str:
    return f"analysis-{cfg.analysis.kind}"


STAGE = analysis  # what lab.runner calls for stage=analysis; conf/stage/analysis.yaml declares the rest
RUN_NAME = run_name
