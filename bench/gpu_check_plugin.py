"""pytest plugin of bench/gpu_check.py's tests step (loaded with ``-p gpu_check_plugin``
and bench/ on PYTHONPATH; it does nothing unless gpu_check sets its variables).

- GPU_CHECK_DEADLINE (a time.time() value): a test that has not started by then is
  skipped with "gpu_check: time budget spent", so that pytest ends by itself and
  writes its JUnit report and --durations before the step's hard timeout.
- GPU_CHECK_BUILD_STATUS (a file) and GPU_CHECK_WAIT_FOR (node-id prefixes, comma
  separated): the CUDA extension is built in the background while the Triton tests
  run. Before the first test matching a prefix, a worker waits for the status file
  ("ok" or "failed: ..."); on failure it sets POSATTN_CUDA_JIT=0 so that no worker
  starts the same failing build again (the tests then skip, naming the reason).
- GPU_CHECK_PROGRESS (a file): one JSON line per test start and per test result
  (node id, phase, outcome, seconds), appended by the process that ran the test (the
  xdist worker when GPU_CHECK_XDIST=1), so that a run cut short still says what
  finished, what was running, and how long each test took.
"""
from __future__ import annotations

import json
import os
import time

import pytest

_build_checked = False


def _progress(**record):
    path = os.environ.get("GPU_CHECK_PROGRESS")
    if not path:
        return
    # Under xdist the controller sees every worker's events again: record them once,
    # in the worker that ran the test.
    if os.environ.get("GPU_CHECK_XDIST") == "1" and not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    record["t"] = round(time.time(), 2)
    record["worker"] = os.environ.get("PYTEST_XDIST_WORKER", "main")
    line = json.dumps(record) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _wait_for_build(deadline):
    """Block until the background build has written its status; returns it."""
    global _build_checked
    status_file = os.environ.get("GPU_CHECK_BUILD_STATUS")
    if _build_checked or not status_file:
        return None
    status = None
    while True:
        if os.path.exists(status_file):
            with open(status_file) as f:
                status = f.read().strip() or "failed: empty status"
            break
        if deadline is not None and time.time() > deadline:
            status = "failed: the CUDA build had not finished by the tests' deadline"
            break
        time.sleep(0.5)
    _build_checked = True
    if status != "ok":
        os.environ["POSATTN_CUDA_JIT"] = "0"
    return status


def pytest_runtest_logstart(nodeid, location):
    _progress(nodeid=nodeid, phase="start")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = os.environ.get("GPU_CHECK_DEADLINE")
    deadline = float(deadline) if deadline else None
    if deadline is not None and time.time() > deadline:
        pytest.skip("gpu_check: time budget spent (not started)")
    prefixes = [p for p in os.environ.get("GPU_CHECK_WAIT_FOR", "").split(",") if p]
    callspec = getattr(item, "callspec", None)
    if any(item.nodeid.startswith(p) for p in prefixes) or (
            callspec is not None and callspec.params.get("backend") == "cuda"):  # test_kernels' cuda twins
        _wait_for_build(deadline)


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _progress(nodeid=report.nodeid, phase=report.when, outcome=report.outcome,
                  seconds=round(report.duration, 3))
