"""The GPU benchmark scripts rehearsed on the CPU (tiny shapes, Triton's interpreter), so a lent GPU's few
minutes are never spent on a script that fails before it measures anything."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--dry-run", *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_gpu_linear_rehearses_every_mode_and_strategy(tmp_path):
    _run("gpu_linear.py", "--out", str(tmp_path), "--tokens", "1", "40")
    rows = json.loads((tmp_path / "gpu_linear.json").read_text())["rows"]
    assert rows and not any("error" in row for row in rows)
    for row in rows:
        assert set(row["strategy"]) == {"a16", "a8", "fp8", "a16-tq1", "fp8-tq1"}
        assert all(isinstance(result, dict) and result["rel_err"] < 2e-2
                   for results in row["strategy_ms"].values() for result in results.values())
    assert "Every strategy on its own" in (tmp_path / "gpu_linear.md").read_text()


def test_gpu_flux_rehearses_every_model(tmp_path):
    _run("gpu_flux.py", "--out", str(tmp_path), "--warmup", "1", "--iters", "1")
    results = json.loads((tmp_path / "gpu_flux.json").read_text())["results"]
    assert set(results) == {"bf16", "fp8", "fp8-tq1", "a16", "a8", "fp8-separate", "bf16-fused"}
    assert all(result["output_finite"] for result in results.values())


def test_gpu_small_m_rehearses_every_candidate_kind(tmp_path):
    _run("gpu_small_m.py", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "gpu_small_m.json").read_text())["rows"]
    assert {(row["strategy"], row["M"]) for row in rows} == {("gemv", 1), ("splitk", 1), ("splitk", 16), ("dp4a", 1),
                                                            ("dp4a", 16), ("dp4a1", 1), ("planar", 1),
                                                            ("planar", 16)}
    for row in rows:
        assert row["candidates"] and all("error" not in c and c["rel_err"] < 4e-2 for c in row["candidates"])
    from bitflux.kernels import triton as triton_backend

    assert all(row["candidates"][0]["pdl"] == triton_backend.PDL and not row["candidates"][1]["pdl"] for row in rows)
    assert "best tile" in (tmp_path / "gpu_small_m.md").read_text()


def test_gpu_operands_rehearses_every_candidate(tmp_path):
    _run("gpu_operands.py", "--out", str(tmp_path))
    results = json.loads((tmp_path / "gpu_operands.json").read_text())["results"]
    assert len(results) == 1
    sweep = results[0]["sweep"]
    # each candidate, for the quantizer alone and with expansion, int8 and e4m3: timed, its outputs equal
    assert len(sweep) == 4 * 8 and all("ms" in row for row in sweep), [row for row in sweep if "ms" not in row]
    assert set(results[0]["calls"]) == {"bf16 cuBLAS", "W1.58 fp8", "W1.58A8"}
