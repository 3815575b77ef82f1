"""bench/gpu_check.py (`make gpu`) without a GPU: its dry run prints the plan and
checks that every test, node id and script it names exists; a made-up id fails it.
Nothing here imports torch in the subprocess or runs a kernel (a fraction of a second)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dry_run(*extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_dry_run_lists_every_step_and_passes():
    r = _dry_run()
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for step in ("[1] install", "[2] cuda-build", "[3] tests", "[4] sanitizer", "[5] bench", "[6] summary"):
        assert step in out, step
    for cmd in ("pip install --no-deps --no-build-isolation", "-m pytest", "-n 16", "--junitxml=",
                "--durations=25", "-p no:cacheprovider", "--tool memcheck --leak-check no", "--tool racecheck",
                "sanitize_case.py triton", "sanitize_case.py cuda", "run.py --quick", "--max-minutes"):
        assert cmd in out, cmd
    assert "tests/test_gpu_large.py::test_offsets_past_2_31_elements[triton-long_keys]" in out
    assert "all exist" in out and "CHECK FAILED" not in out


def test_dry_run_does_not_import_torch():
    code = (f"import sys; sys.argv = ['gpu_check', '--dry-run']; sys.path.insert(0, {str(SCRIPT.parent)!r}); "
            "import gpu_check; rc = gpu_check.main(['--dry-run']); "
            "assert 'torch' not in sys.modules, 'the dry run imported torch'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_made_up_test_ids_fail_the_check(gpu_check, tmp_path):
    assert gpu_check.check_selection(gpu_check.TEST_SELECTION) == []
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('D', [8, 64])\ndef test_dims(D): pass\n"
        "@pytest.mark.parametrize('flag', [True, False])\n@pytest.mark.parametrize('mask', [None, 'bool'])\n"
        "def test_stacked(mask, flag): pass\n"
        "@pytest.mark.parametrize('dtype', [1, 2], ids=str)\ndef test_callable_ids(dtype): pass\n"
        "class TestGroup:\n    def test_method(self): pass\n"
        "def test_plain(): pass\n")
    bad = ["tests/test_x.py::test_no_such_test",
           "tests/test_x.py::test_dims[65]",
           "tests/no_such_file.py",
           "tests/test_x.py::test_stacked[True-None]",
           "tests/test_x.py::test_callable_ids[1]",
           "tests/test_x.py::TestGroup::test_nope"]
    problems = gpu_check.check_selection(bad, repo=tmp_path)
    assert len(problems) == 6, problems
    assert "no test test_no_such_test" in problems[0]
    assert "no parametrized id [65]" in problems[1]
    assert "no file" in problems[2]
    assert "no parametrized id [True-None]" in problems[3]      # the nearest decorator's id comes first
    assert "cannot be read statically" in problems[4]           # ids=str: not verifiable, so refused
    assert "no test TestGroup::test_nope" in problems[5]
    # real ids (as `pytest --collect-only` prints them) pass
    assert gpu_check.check_selection(["tests/test_x.py::test_dims[64]", "tests/test_x.py::test_stacked[None-True]",
                                      "tests/test_x.py::test_stacked[bool-False]", "tests/test_x.py::test_plain",
                                      "tests/test_x.py::TestGroup::test_method", "tests/test_x.py"],
                                     repo=tmp_path) == []
    # and the CLI: --select with a made-up id makes the dry run fail
    r = _dry_run("--select", "tests/test_kernels.py::test_no_such_test")
    assert r.returncode == 1 and "CHECK FAILED" in r.stdout and "test_no_such_test" in r.stdout


def test_param_ids_read_statically(gpu_check):
    import ast
    src = (
        "import pytest\nIDS = ['a-x', 'b-y']\n"
        "@pytest.mark.parametrize('p, q', [(1, 2), (3, 4)], ids=IDS)\ndef test_one(p, q): pass\n"
        "@pytest.mark.parametrize('d', ['f32', 'bf16'])\n@pytest.mark.parametrize('m', [1, 2])\n"
        "def test_two(m, d): pass\n"
    )
    tree = ast.parse(src)
    one, two = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert gpu_check.static_param_ids(tree, one) == ["a-x", "b-y"]
    assert gpu_check.static_param_ids(tree, two) == ["1-f32", "1-bf16", "2-f32", "2-bf16"]


def test_sanitizer_verdicts(gpu_check):
    class FakeJob:
        name, wall, timeout = "memcheck-triton", 3.0, 60

        def __init__(self, rc, timed_out=False):
            self.rc, self.timed_out = rc, timed_out

    j = gpu_check.judge_sanitizer
    assert j(FakeJob(0), "SANITIZE-CASE: start\nSANITIZE-CASE: ok\n========= ERROR SUMMARY: 0 errors\n")["status"] \
        == "passed"
    r = j(FakeJob(1), "SANITIZE-CASE: start\n========= Invalid __global__ read of size 4\n"
                      "========= ERROR SUMMARY: 3 errors\n")
    assert r["status"] == "failed" and r["errors"] == 3 and "Invalid __global__ read" in r["why"]
    assert j(FakeJob(1), "$ cmd\n========= Error: Insufficient permissions to use the debugger\n")["status"] \
        == "refused"
    # the case's own crash before it started is a failure, whatever its words
    assert j(FakeJob(1), "$ cmd\nPermissionError: [Errno 13] Permission denied: 'x'\n"
                         "========= ERROR SUMMARY: 0 errors\n")["status"] == "failed"
    assert j(FakeJob(0), "SANITIZE-CASE: skip: backend 'cuda' refused: extension not built\n")["status"] == "skipped"
    assert j(FakeJob(-9, timed_out=True), "SANITIZE-CASE: start\n")["status"] == "timeout"
    race = ("SANITIZE-CASE: start\nSANITIZE-CASE: ok\n========= RACECHECK SUMMARY: 2 hazards displayed "
            "(0 errors, 2 warnings)\n========= ERROR SUMMARY: 0 errors\n")
    r = j(FakeJob(0), race)
    assert r["status"] == "passed" and "2 racecheck warnings" in r["why"]
    assert j(FakeJob(0), race.replace("(0 errors", "(1 errors"))["status"] == "failed"


def test_test_report_summary(gpu_check, tmp_path):
    """Counts, failures' first lines, time-budget skips and unfinished tests, from a JUnit
    report and the plugin's progress lines (the report is missing when pytest was killed)."""
    xml = tmp_path / "pytest.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="tests.test_kernels" name="test_a[x]" time="1.0"/>'
        '<testcase classname="tests.test_kernels" name="test_b" time="2.0">'
        '<failure message="AssertionError: errors above tolerance (err, limit): dq: 0.5 &gt; 0.01&#10;more">'
        'tb</failure></testcase>'
        '<testcase classname="tests.test_relative" name="test_c" time="0.0">'
        '<skipped message="gpu_check: time budget spent (not started)"/></testcase>'
        '<testcase classname="tests.test_cuda_backend" name="test_d" time="0.0">'
        '<skipped message="backend \'cuda\' refused: extension not built"/></testcase>'
        '</testsuite></testsuites>')
    progress = tmp_path / "progress.jsonl"
    progress.write_text("\n".join([
        '{"nodeid": "tests/test_kernels.py::test_a[x]", "phase": "start"}',
        '{"nodeid": "tests/test_kernels.py::test_a[x]", "phase": "call", "outcome": "passed", "seconds": 1.0}',
        '{"nodeid": "tests/test_kernels.py::test_b", "phase": "start"}',
        '{"nodeid": "tests/test_kernels.py::test_b", "phase": "call", "outcome": "failed", "seconds": 2.0}',
        '{"nodeid": "tests/test_property.py::test_random_configurations", "phase": "start"}',
        "not json"]))
    res = gpu_check.summarize_tests(xml, progress)
    assert res["counts"] == "1 passed, 1 failed, 0 errors, 2 skipped (1 not started: time budget)"
    assert res["budget_skipped"] == 1
    assert res["failures"] == ["tests/test_kernels.py::test_b: AssertionError: errors above tolerance "
                               "(err, limit): dq: 0.5 > 0.01"]
    details = "\n".join(res["details"])
    assert "still running when the step ended: tests/test_property.py::test_random_configurations" in details
    assert "tests/test_kernels.py::test_b 2.0 s" in details and "extension not built" in details
    xml.unlink()
    res = gpu_check.summarize_tests(xml, progress)
    assert res["counts"].startswith("no JUnit report") and "1 unfinished" in res["counts"]
    assert res["failures"] == ["tests/test_kernels.py::test_b: failed (see pytest.log)"]
