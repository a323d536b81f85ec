"""benchmarks/gpu_attention.py and gpu_run.sh, the script a lent GPU runs (minutes of device time, rarely
lent): they must not fail on the GPU for a reason a CPU can show first. The sections run here at toy
sizes (--smoke; the Hopper variants are skipped off a Hopper GPU), and gpu_run.sh must parse."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_run_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_run.sh")], check=True)


def test_target_anatomy_and_route_sections_run(tmp_path):
    """The sections new to the next GPU run, end to end at toy sizes: every line printed, no section failed."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_attention.py"), "--smoke", "--sections",
         "ceilings,target,route,anatomy", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout
    assert "FAILED" not in log and "failed" not in log, log[-3000:]
    assert log.count("speed vs cudnn") == 2  # one ratio line per round
    assert "anatomy pallas_gpu" in log and " fit: " in log and "anatomy tile_meta alone" in log
    for impl in ("pallas_gpu", "pallas_gpu triton", "cudnn", "auto"):  # forward and forward + backward each
        assert sum(line.startswith("route B=4") and f" {impl:17s} fwd " in line and "fwd+bwd" in line
                   and "forward only" not in line for line in log.splitlines()) == 1, (impl, log[-3000:])
    assert (tmp_path / "gpu_attention_ceilings_target_route_anatomy.md").exists()
