"""torch.compile through the engine (slow: a cold compile takes about half a minute on 2 cores)."""
from __future__ import annotations

import pytest

from labtest import FAST, all_runs, loss_history


@pytest.mark.slow
def test_compiled_run_matches_eager_losses(lab_cli, tmp_path):
    lab_cli(*FAST, "tracking.experiment=eager", "hardware.precision=fp32", "hardware.compile=false")
    lab_cli(*FAST, "tracking.experiment=compiled", "hardware.precision=fp32", "hardware.compile=true", timeout=600)
    runs = {r.data.tags["lab.config_hash"]: r for r in all_runs(tmp_path)}
    eager, compiled = sorted(runs.values(), key=lambda r: r.data.params["hardware.compile"] == "True")
    assert compiled.data.params["hardware.compile"] == "True" and compiled.info.status == "FINISHED"
    a, b = loss_history(tmp_path, eager.info.run_id), loss_history(tmp_path, compiled.info.run_id)
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-3 for s in a)
