"""The CPU FLUX benchmark's measuring step, at one double and one single block of FLUX.1-dev width and a
few tokens, so that the script the figures in BENCHMARKS.md come from keeps running."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitflux.kernels import cpu

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(cpu.available() is not None, reason=f"cpu backend: {cpu.available()}")
@pytest.mark.parametrize("packing", ["tq2", "tq1"])
def test_cpu_flux_measures_a_ternary_forward(packing):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_flux.py"), "--child", "1", "1", "1",
                             "--image-tokens", "16", "--text-tokens", "8", "--packing", packing],
                            capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["variant"] == "ternary" and row["packing"] == packing and row["output_finite"]
    # one double + one single block of ternary codes and the fp32 embedders: far below their fp32 2.2 GB
    assert 0 < row["weight_bytes"] < 0.5e9 and row["forward_s"] > 0 and row["peak_rss_bytes"] > row["weight_bytes"]


@pytest.mark.skipif(cpu.available() is not None, reason=f"cpu backend: {cpu.available()}")
def test_cpu_linear_compares_a_layer_with_fp32(tmp_path):
    """The per-layer benchmark, one tiny shape, tq1 codes (widened as the kernel reads them)."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_linear.py"), "--m", "1", "20", "--shapes", "80x48",
                             "--packing", "tq1", "--no-bf16", "--min-seconds", "0", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["M"] for row in rows] == [1, 20] and all(row["packing"] == "tq1" for row in rows)
    # held: 16 bytes a row of tq1 codes (80 / 5) plus scale and bias, far below fp32's 80 x 48 x 4
    assert all(0 < row["bitflux_bytes"] < row["fp32_bytes"] / 10 and row["speedup"] > 0 for row in rows)


@pytest.mark.skipif(cpu.available() is not None, reason=f"cpu backend: {cpu.available()}")
def test_cpu_linear_times_several_isa_paths(tmp_path):
    """--isas: each path timed in turns, the first one the bitflux column; a path the CPU lacks: one line."""
    out = tmp_path / "rows.json"
    args = [sys.executable, str(BENCHMARKS / "cpu_linear.py"), "--m", "3", "--shapes", "64x32", "--no-bf16",
            "--min-seconds", "0", "--json", str(out), "--isas"]
    result = subprocess.run([*args, *reversed(cpu.supported_isas())], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert list(row["isa_ms"]) == cpu.supported_isas()[::-1] and row["isa"] == cpu.supported_isas()[-1]
    missing = [isa for isa in cpu.ISAS if isa not in cpu.supported_isas()]
    if missing:
        result = subprocess.run([*args, missing[0]], capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 1 and "this CPU lacks" in result.stderr


def test_cpu_text_encoder_compares_fp32_with_narrow_weights(tmp_path):
    """The text encoder benchmark on a T5 of width 64: half the parameter bytes narrow, the blocks' none
    streamed, the same encoding."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_text_encoder.py"), "--tiny", "--layers", "2",
                             "--tokens", "16", "--dir", str(tmp_path), "--json", str(out)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    fp32, ours, streamed = json.loads(out.read_text())
    assert (fp32["variant"], ours["variant"], streamed["variant"]) == ("fp32", "bitflux", "streamed")
    assert fp32["output_sha256"] == ours["output_sha256"] == streamed["output_sha256"]
    assert fp32["parameter_bytes"] > 1.8 * ours["parameter_bytes"] > 1.8 * streamed["parameter_bytes"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_a_childs_peak_memory_is_its_own():
    """The CPU benchmarks run each variant in a child process for its own peak; getrusage's ru_maxrss there
    counts the parent's peak too (inherited at exec), VmHWM (peak_resident_bytes) does not."""
    from bitflux.calibrate.memory import peak_resident_bytes

    big = torch.ones(2**30 // 4)  # 1 GiB touched by this process
    del big
    code = "from bitflux.calibrate.memory import peak_resident_bytes; print(peak_resident_bytes())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert 0 < int(child.stdout) < 2**30 <= peak_resident_bytes()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc")
def test_the_peak_memory_starts_afresh_when_reset():
    """`bitflux bench` resets the peak after its warm-up, so that loading and encoding do not count."""
    from bitflux.calibrate.memory import (
        peak_resident_bytes,
        reset_peak_resident,
        resident_bytes,
    )

    big = torch.ones(2**30 // 4)  # 1 GiB touched, then freed
    del big
    assert peak_resident_bytes() >= resident_bytes() + 2**29
    assert reset_peak_resident()
    assert peak_resident_bytes() < resident_bytes() + 2**29


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_cpu_tile_times_every_path_this_cpu_has(tmp_path):
    """The C tile benchmark (it includes the kernel source) builds with setup.py's flags and times each path."""
    binary = tmp_path / "cpu_tile"
    command = ["gcc", "-O3", "-std=c11", "-fopenmp", "-ffp-contract=off", str(BENCHMARKS / "cpu_tile.c"), "-o", str(binary)]
    for extra in ([], ["-DBF_NO_AVXVNNI"]):  # as setup.py: an assembler without AVX-VNNI builds the rest
        built = subprocess.run(command + extra, capture_output=True, text=True, timeout=300, check=False)
        if built.returncode == 0:
            break
    if built.returncode != 0 and cpu.available() is not None:
        pytest.skip(f"this machine builds no C kernel either: {cpu.available()}")
    assert built.returncode == 0, built.stderr[-3000:]
    result = subprocess.run([str(binary), "0.01"], capture_output=True, text=True, timeout=120, check=True)
    timed = [line.split()[0] for line in result.stdout.splitlines()]
    assert timed[0] == "generic" and (cpu.available() is not None or timed[-1] == cpu.supported_isas()[-1])
    assert all("G multiply-adds/s" in line for line in result.stdout.splitlines())


def test_cpu_ternarize_compares_with_another_revision():
    """The ternarize benchmark against this very revision, at a tiny shape: every granularity the same bits."""
    if shutil.which("git") is None or not (BENCHMARKS.parent / ".git").exists():
        pytest.skip("needs the git repository")
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_ternarize.py"), "--before", "HEAD",
                             "--shape", "40x300"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "True" in line]
    assert len(rows) == 3
