"""`lab stage=bench` prints engine and bare-loop throughput and logs them to MLflow."""
from __future__ import annotations

import re

import pytest

from labtest import FAST, all_runs


def test_bench_reports_and_logs_throughput(lab_cli, tmp_path):
    proc = lab_cli("stage=bench", *FAST, "bench.steps=3", "bench.warmup=1", "bench.rounds=1")
    (run,) = all_runs(tmp_path)
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["lab.stage"] == "bench"
    # one round: the ratio of medians is the median of ratios, so the logged figures must agree exactly
    assert m["bench/engine_over_bare"] == pytest.approx(m["bench/engine_tokens_per_sec"] / m["bench/bare_tokens_per_sec"])
    # the two loops trained the same model from the same init on the same batches: same loss after 4 steps
    assert m["bench/engine_last_loss"] == pytest.approx(m["bench/bare_last_loss"], rel=1e-4)
    assert m["bench/engine_last_loss"] < 6.24  # and it learned: below ln(512), the uniform guess
    assert m["bench/peak_memory_mb"] > 100  # this process's RSS, torch included
    printed = {k: float(re.search(rf"{k}\s+([\d.,]+)", proc.stdout)[1].replace(",", "")) for k in ("engine/bare", "engine ", "bare loop")}
    assert abs(printed["engine/bare"] - m["bench/engine_over_bare"]) < 1e-3
    assert abs(printed["engine "] - m["bench/engine_tokens_per_sec"]) < 1
    assert abs(printed["bare loop"] - m["bench/bare_tokens_per_sec"]) < 1
    assert "MFU" in proc.stdout and "n/a" in proc.stdout  # the cpu profile has no known peak
    # ...but the machine's own matmul roofline is always measured, so a CPU run has an MFU too
    flops = 6 * (m["bench/n_params"]) + 12 * 2 * 64 * 64
    assert m["bench/matmul_tflops"] > 0.001
    assert m["bench/mfu_engine_vs_matmul"] == pytest.approx(m["bench/engine_tokens_per_sec"] * flops / 1e12
                                                            / m["bench/matmul_tflops"], rel=1e-6)
    assert "of this machine's measured matmul peak" in proc.stdout


def test_bench_reports_mfu_when_the_peak_is_known(lab_cli, tmp_path):
    lab_cli("stage=bench", *FAST, "bench.steps=2", "bench.warmup=1", "bench.rounds=1",
            "hardware.peak_tflops=1.0")
    (run,) = all_runs(tmp_path)
    m = run.data.metrics
    flops = 6 * (m["bench/n_params"]) + 12 * 2 * 64 * 64  # micro: tied head counted once, 2 layers, dim 64
    assert 0 < m["bench/mfu_engine"] < 1
    assert abs(m["bench/mfu_engine"] - m["bench/engine_tokens_per_sec"] * flops / 1e12) / m["bench/mfu_engine"] < 1e-6


def test_the_peak_comes_from_the_profile_or_the_cuda_device_name(monkeypatch):
    import torch

    from lab.config import HardwareConfig
    from lab.hardware import peak_tflops

    cuda = torch.device("cuda")
    assert peak_tflops(HardwareConfig(peak_tflops=58.3), cuda) == (58.3, "hardware.peak_tflops=58.3")
    for name, expected in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H200", 989.4),
                           ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0), ("NVIDIA GeForce RTX 4090", 165.2)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_tflops(HardwareConfig(name="cuda", device="cuda"), cuda)[0] == expected, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    value, why = peak_tflops(HardwareConfig(name="cuda", device="cuda"), cuda)
    assert value is None and "set hardware.peak_tflops" in why
