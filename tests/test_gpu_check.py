"""The GPU check script (benchmarks/gpu_check/): its CPU smoke run passes and writes the page; a failing check
makes it exit non-zero."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_check


def test_cpu_smoke_run_writes_page(tmp_path):
    page = tmp_path / "gpu.md"
    assert gpu_check.main(["--device", "cpu", "--quick", "--page", str(page)]) == 0
    text = page.read_text()
    assert "all checks passed" in text
    for name in ("ms_deform_attn vs float64 reference", "fp16 + scaler", "loss falls", "torchrun", "ONNX Runtime on the device",
                 "Inference throughput", "Training throughput", "Kernel profile"):
        assert name in text, name
    assert "FAILED" not in text


def test_failed_check_is_recorded_and_the_rest_go_on():
    report = gpu_check.Report(torch.device("cpu"))
    report.check("fails", lambda: gpu_check.require(False, "2 > 1 expected\nsecond line"))
    report.check("errors", lambda: 1 / 0)
    report.check("passes", lambda: "fine")
    assert [c["ok"] for c in report.checks] == [False, False, True]
    assert report.checks[0]["detail"] == "CheckFailed: 2 > 1 expected"
    assert report.checks[1]["detail"].startswith("ZeroDivisionError")
    assert not report.ok
    assert "SOME CHECKS FAILED" in gpu_check.render(report, "cmd", 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_one_line_error(capsys):
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
