"""Bounded foreign processes (issue 16, class 4): a teacher command run by `edgekd label` (the real CLI) cannot
make edgekd hold its output in memory, and nothing it started outlives edgekd's handling of it: its whole
process group ends on exit, error, timeout, SIGTERM and SIGINT, and the temporary folder (the copy of the
batch) is removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgekd import runfolder
from tests.refusal import assert_refused, cli_env, pid_alive

TEACHER = r'''
import os, subprocess, sys, time

mode, piddir = sys.argv[1], sys.argv[2]


def started_a_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.path.join(piddir, "pids.tmp"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(os.path.join(piddir, "pids.tmp"), os.path.join(piddir, "pids"))


if mode == "flood":     # 300 MB on stdout and 300 MB on stderr, then a failure
    block = b"x" * (1 << 20) + b"\n"
    for _ in range(300):
        sys.stdout.buffer.write(block)
        sys.stderr.buffer.write(block)
    sys.stderr.write("the teacher gave up after flooding\n")
    sys.exit(1)
if mode == "quiet":
    sys.stderr.write("the teacher gave up quietly\n")
    sys.exit(1)
started_a_child()
if mode == "orphan":    # fails, leaving its child running
    sys.stderr.write("failed, child left behind\n")
    sys.exit(1)
time.sleep(600)         # "hang"
'''

RECIPE = """
[data]
source = "data.npz"
[teacher]
model = "mlp:hidden=8"
[student]
model = "mlp:hidden=8"
"""


@pytest.fixture
def case(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x_train=rng.random((40, 1, 8, 8), dtype=np.float32), y_train=np.arange(40) % 4,
             x_test=rng.random((8, 1, 8, 8), dtype=np.float32), y_test=np.arange(8) % 4,
             x_unlabeled=rng.random((8, 1, 8, 8), dtype=np.float32))
    (tmp_path / "r.toml").write_text(RECIPE)
    (tmp_path / "teacher.py").write_text(TEACHER)
    (tmp_path / "pids").mkdir()
    return tmp_path


def label_args(case: Path, mode: str, timeout: float = 600) -> list[str]:
    return [sys.executable, "-m", "edgekd", "label", "r.toml", "--teacher",
            f"cmd:{sys.executable} teacher.py {mode} {case / 'pids'}", "--out", "labels", "--timeout", str(timeout),
            "--quiet"]


def start(case: Path, mode: str, timeout: float = 600) -> subprocess.Popen:
    return subprocess.Popen(label_args(case, mode, timeout), cwd=case, env=cli_env(case / "tmp"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_pids(case: Path, proc: subprocess.Popen) -> list[int]:
    deadline = time.monotonic() + 120
    while not (case / "pids" / "pids").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the teacher command never started"
        time.sleep(0.1)
    return [int(p) for p in (case / "pids" / "pids").read_text().split()]


def assert_all_gone(case: Path, pids: list[int]) -> None:
    """The teacher and its child are ended, the batch's temporary folder removed, the run folder unlocked."""
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if pid_alive(p)], "a teacher process outlived edgekd"
    assert not list((case / "tmp").glob("edgekd-teacher-*")), "the batch's temporary folder was left behind"
    assert not (case / "labels" / runfolder.LOCK).exists()


def peak_rss_mb(case: Path, mode: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run the CLI and return its peak resident memory (the teacher, a waited-for child, is included)."""
    proc = subprocess.Popen(label_args(case, mode), cwd=case, env=cli_env(case / "tmp"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stderr = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)


def test_a_flood_of_output_costs_no_memory_and_its_tail_names_the_failure(case):
    quiet_mb, r = peak_rss_mb(case, "quiet")
    assert_refused(r, "exited with code 1 on a batch of 8 inputs", "last stderr line: the teacher gave up quietly")
    flood_mb, r = peak_rss_mb(case, "flood")
    assert_refused(r, "exited with code 1", "last stderr line: the teacher gave up after flooding")
    # 600 MB went through the pipes; holding it (as communicate() did) would cost that much again and more
    assert flood_mb - quiet_mb < 100, (flood_mb, quiet_mb)


def test_a_hanging_teacher_and_its_children_end_at_the_timeout(case):
    proc = start(case, "hang", timeout=3)
    pids = wait_for_pids(case, proc)
    out, err = proc.communicate(timeout=120)
    assert_refused(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                   "did not finish within 3 s on a batch of 8 inputs (killed")
    assert_all_gone(case, pids)


def test_a_failing_teacher_leaves_no_child_running(case):
    proc = start(case, "orphan")
    out, err = proc.communicate(timeout=120)
    assert_refused(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                   "exited with code 1", "last stderr line: failed, child left behind")
    assert_all_gone(case, [int(p) for p in (case / "pids" / "pids").read_text().split()])


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_stopping_edgekd_ends_the_teacher_and_removes_its_files(case, sig, code):
    proc = start(case, "hang")
    pids = wait_for_pids(case, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert_all_gone(case, pids)
