"""The benchmark command runs end to end (small config) and writes its JSON."""
import json
import subprocess
import sys

from nextrec_fast import cli


def test_bench_small_config(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--config", "small", "--batch-size", "64", "--repeats", "1", "--warmup", "0",
                     "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "speed-up" in table and "mmoe" in table and "esmm" in table
    result = json.loads(out.read_text())
    assert {r["mode"] for r in result["rows"]} == {"forward_eval", "forward_backward", "train_step"}
    assert all(r["reference_ms"] > 0 and r["fast_ms"] > 0 for r in result["rows"])
    assert result["environment"]["torch"]


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "nextrec_fast", "bench", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--batch-size" in proc.stdout


def test_import_never_imports_nextrec():
    code = "import sys, nextrec_fast; assert 'nextrec' not in sys.modules, 'nextrec imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
