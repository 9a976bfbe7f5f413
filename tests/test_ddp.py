"""Data-parallel distillation with torchrun on CPU (gloo, 2 processes)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

RECIPE = """
[data]
source = "digits"
[teacher]
model = "cnn:widths=8,16"
epochs = 4
batch_size = 64
[student]
model = "mlp:hidden=32"
epochs = 8
batch_size = 32
[distill]
baseline = false
"""


@pytest.mark.skipif(not shutil.which("torchrun") and not os.path.exists(os.path.join(os.path.dirname(sys.executable),
                                                                                       "torchrun")),
                    reason="torchrun is not installed")
def test_torchrun_ddp_student_fsdp_teacher_matches_single_process(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "edgekd", "teacher", str(tmp_path / "r.toml"), "--out", str(single),
                        "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    shutil.copytree(single, ddp)
    r = subprocess.run([sys.executable, "-m", "edgekd", "distill", str(tmp_path / "r.toml"), "--out", str(single),
                        "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # 2 processes: the student in DDP, the teacher sharded with FSDP (each rank holds half its weights)
    (tmp_path / "f.toml").write_text(RECIPE + "teacher_fsdp = true\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run([*torchrun, "-m", "edgekd", "distill", str(tmp_path / "f.toml"), "--out", str(ddp),
                        "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| student |") == 1          # only rank 0 prints
    m_single = json.loads((single / "metrics.json").read_text())["student"]
    m_ddp = json.loads((ddp / "metrics.json").read_text())["student"]
    assert m_ddp["world_size"] == 2
    assert m_ddp["max_param_divergence"] == 0.0         # DDP kept the two replicas identical
    assert abs(m_ddp["accuracy"] - m_single["accuracy"]) < 0.05, (m_ddp["accuracy"], m_single["accuracy"])
