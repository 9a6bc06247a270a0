"""`nextrec-fast plot` and `bench --plot` draw a PNG from bench results."""
import json

import pytest

from nextrec_fast import cli

pytest.importorskip("matplotlib", reason="plotting needs matplotlib (pip install matplotlib, the 'plot' extra)")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_result() -> dict:
    rows = [dict(model=model, mode=mode, batch=2048, reference_ms=10.0 * speedup, fast_ms=10.0, speedup=speedup)
            for model, base in (("mmoe", 3.0), ("ple", 2.0), ("esmm", 1.5))
            for mode, speedup in (("forward_eval", base), ("forward_backward", base * 0.8), ("train_step", base * 0.5))]
    environment = dict(device="cpu", device_name="x86_64", torch="2.x", python="3.11", threads=2,
                       pooling_op="torch embedding_bag", triton=None, config="default")
    return {"environment": environment, "rows": rows}


def test_plot_command_draws_png(tmp_path, capsys):
    results, png = tmp_path / "bench.json", tmp_path / "plots" / "speedup.png"
    results.write_text(json.dumps(synthetic_result()))
    assert cli.main(["plot", str(results), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    assert str(png) in capsys.readouterr().out


def test_title_names_device_and_versions():
    from nextrec_fast.bench.plotting import plot_title
    title = plot_title({**synthetic_result()["environment"], "batch": 2048})
    assert "cpu" in title and "torch 2.x" in title and "batch 2048" in title


def test_bench_plot_option(tmp_path):
    png = tmp_path / "bench.png"
    assert cli.main(["bench", "--config", "small", "--model", "esmm", "--mode", "forward_eval", "--batch-size", "32",
                     "--repeats", "1", "--warmup", "0", "--quiet", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_SIGNATURE
