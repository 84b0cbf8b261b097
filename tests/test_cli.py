"""The `graphc` command: help for every subcommand, a short demo run that writes every file,
`show` and `report` on a script, and `profile`."""
import json
import re
import subprocess
import sys

import pytest

import graphc_runtime as rt
from graphc.tools.cli import main


TINY_MODEL = ("import graphc as gc\n"
              "g = gc.Graph('tiny')\n"
              "x = g.input('x', (4, 3))\n"
              "y = g.input('y', (4,), dtype='int32')\n"
              "loss = gc.softmax_cross_entropy(gc.linear(x, g.param('w', (2, 3)), g.param('b', (2,))), y)\n")


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["show", "--help"], ["report", "--help"],
                                  ["profile", "--help"]])
def test_help_explains_every_option(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: graphc" in text
    if argv == ["demo", "--help"]:
        for option in ("--out", "--epochs", "--batch", "--lr", "--seed", "--threads", "--quick", "--no-progress"):
            assert option in text


def test_quick_demo_prints_every_classifier_and_writes_its_files(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for name in ("logistic regression", "softmax on pixels", "softmax on orientation histograms",
                 "1-nearest neighbour", "3-nearest neighbour", "decision tree", "MLP", "CNN"):
        assert name in text
    assert "DIFFERS" not in text
    for picture in ("cnn_training.png", "learning_curve.png", "cnn_conv1_filters.png"):
        assert (tmp_path / picture).stat().st_size > 1000
    report = (tmp_path / "cnn_report.html").read_text()
    assert "graphc report: digits_cnn (training step)" in report
    data = json.loads(re.search(r'id="graphc-data">(.*?)</script>', report, re.S).group(1))
    assert any(node["kind"] == "backward" for node in data["graphs"][1]["nodes"].values())
    assert all(kernel["us"] >= 0 for kernel in data["kernels"])      # timed on a minibatch
    assert not list(tmp_path.glob("*.dot"))                          # no Graphviz needed
    from graphc.tools.checkpoint import load_params
    assert "conv1.w" in load_params(tmp_path / "cnn_params.npz")


def test_show_prints_forward_backward_and_kernels(tmp_path, capsys):
    script = tmp_path / "model.py"
    script.write_text(TINY_MODEL)
    assert main(["show", str(script), "--grad", "--out", str(tmp_path / "graphs")]) == 0
    text = capsys.readouterr().out
    assert "graph 'tiny'" in text and "* %" in text          # backward nodes are listed and marked
    assert "[k0 gemm" in text                                 # the kernel of each optimized node
    assert (tmp_path / "graphs" / "0_tiny_kernels.dot").read_text().count("subgraph cluster_") >= 2


def test_report_writes_a_page_per_graph(tmp_path, capsys):
    script = tmp_path / "model.py"
    script.write_text(TINY_MODEL + "h = gc.Graph('plain')\nz = gc.exp(h.input('z', (5,)))\n")
    assert main(["report", str(script), "--out", str(tmp_path / "reports")]) == 0
    text = capsys.readouterr().out
    tiny, plain = tmp_path / "reports" / "0_tiny.html", tmp_path / "reports" / "1_plain.html"
    assert f"wrote {tiny}" in text and f"wrote {plain}" in text
    assert "graphc report: tiny (training step)" in tiny.read_text()
    assert 'data-graph="backward"' in tiny.read_text() and 'data-graph="backward"' not in plain.read_text()


def test_report_of_a_script_without_graphs_fails(tmp_path, capsys):
    script = tmp_path / "empty.py"
    script.write_text("x = 1\n")
    assert main(["report", str(script), "--out", str(tmp_path)]) == 1
    assert "built no graphc graph" in capsys.readouterr().out


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "graphc", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "demo" in result.stdout


@pytest.mark.skipif(rt.usable_cpu_count() < 2, reason="one usable CPU")
def test_calibrate_measures_again_and_replaces_the_cached_costs(tmp_path, monkeypatch, capsys):
    from graphc.backend import thread_costs
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    thread_costs._measured.cache_clear()
    try:
        assert main(["calibrate"]) == 0
        printed = capsys.readouterr().out
        assert "GFLOP/s" in printed and "fork/join" in printed and "efficiency" in printed

        def no_measuring(max_threads):
            raise AssertionError("measured again instead of reading the calibration")
        monkeypatch.setattr(thread_costs, "_measure", no_measuring)
        costs = thread_costs.measured_thread_costs(rt.get_num_threads())
        assert f"{costs.fork_join_s[2] * 1e6:.2f} µs" in printed
    finally:
        thread_costs._measured.cache_clear()
