"""bench/swin.py (Swin window attention against the gathered-table route) runs and
agrees with that route: its CPU smoke run, through the Triton kernels when the
interpreter is on."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "swin.py"


def test_swin_bench_smoke(capsys):
    spec = importlib.util.spec_from_file_location("posattn_bench_swin", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    worst = mod.main(["--smoke"])
    out = capsys.readouterr().out
    assert "posattn" in out and "gather+sdpa" in out
    assert worst < 1e-4   # float32: output and every gradient, the table's included
