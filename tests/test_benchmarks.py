"""The GPU benchmark script runs end to end at tiny size on the CPU and prints its tables."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_hybrid_gpu_script_smoke():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "hybrid_gpu.py"), "--device", "cpu", "--tiny",
         "--parts", "latency", "train", "distill", "--sizes", "64", "128x64", "--modes", "eager", "--iters", "1",
         "--train", "t2md:64x2", "--distill", "64x2", "--warmup", "1", "--steps", "1"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FAILED" not in result.stdout, result.stdout[-2000:]
    assert "| t2md | eager | 128x64 | 32 |" in result.stdout and "| eager | 64x64 |" in result.stdout
    assert "| t2md | 64^2 | 2 | no |" in result.stdout
    assert "| forcing | 64^2 | 2 |" in result.stdout and "| kd | 64^2 | 2 |" in result.stdout


def test_multi_gpu_script_smoke(tmp_path):
    """Two CPU processes (gloo) stand in for two GPUs."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "multi_gpu.py"), "--device", "cpu", "--tiny", "--parts",
         "speed", "--backbones", "dit-xl/2", "--strategies", "fsdp", "--warmup", "1", "--steps", "2", "--batch", "2",
         "--out", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| dit-xl/2 | 64^2 | 2 | auto | 1 |" in result.stdout and "| dit-xl/2 | 64^2 | 2 | fsdp | 2 |" in result.stdout
