"""`fastformer bench`'s outputs: the CSV's columns and quantiles, the JSON's environment, the PNG, and --help."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from fastformer.benchmarks import bench_layer_norm, common

from fastformer import cli

PNG = b"\x89PNG\r\n\x1a\n"


def _read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run's labels and speed")
def test_layer_norm_writes_csv_json_and_plot(tmp_path, capsys):
    out_csv, png, out_json = tmp_path / "ln.csv", tmp_path / "ln.png", tmp_path / "ln.json"
    argv = ["--quick", "--csv", str(out_csv), "--plot", str(png), "--json", str(out_json)]
    bench_layer_norm.main(argv)
    printed = capsys.readouterr().out
    assert "== layer_norm on CPU (" in printed
    assert "not timed: fastformer-triton" in printed and "interpreter" in printed

    header, rows = _read_csv(out_csv)
    assert header == list(common.CSV_COLUMNS)
    assert {r["provider"] for r in rows} == {"fastformer-torch", "torch"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["metric"] for r in rows} >= {"ms", "GB/s", "vs torch"}
    for r in rows:
        median, p20, p80 = float(r["median"]), float(r["p20"]), float(r["p80"])
        assert p20 <= median <= p80, r  # time: p20 the fast end; rates: derived so that the order still holds
        assert r["op"] == "layer_norm" and r["dtype"] == "float32" and r["shape"] == "hidden=768 rows=512"
        assert r["device"].startswith("CPU (") and r["commit"] not in ("", None)
        assert "torch=" in r["versions"] and "triton=" in r["versions"] and "T" in r["date"]

    payload = json.loads(out_json.read_text())
    assert payload["env"]["device"].startswith("CPU (") and payload["env"]["commit"]
    assert any(n.startswith("CPU run:") for n in payload["notes"])
    assert png.read_bytes().startswith(PNG)
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed into place


def test_csv_rows_of_model_benchmarks():
    """bench_models' rows (task, shape, one wall-clock time, no quantiles) map to sane CSV rows."""
    env = {"device": "CPU (x86_64, 2 threads)", "versions": "torch=x", "commit": "abc", "time": "2025-01-01T00:00"}
    rows = [
        {"task": "train gpt", "shape": "B2 S64", "provider": "fastformer", "ms": 4.0, "tokens_per_s": 32e3, "mfu": 0.1},
        {"task": "train gpt", "provider": "transformers-eager", "error": "boom"},
    ]
    out = common.csv_rows("models", rows, env, "bfloat16")
    assert [r["metric"] for r in out] == ["ms", "tokens_per_s", "mfu"]
    assert all(r["op"] == "models" and r["mode"] == "train gpt" and r["shape"] == "B2 S64" for r in out)
    assert all(r["p20"] == r["p80"] == "" for r in out)  # one measurement: no spread to report


def test_rates_take_their_quantiles_from_the_time():
    env = {"device": "d", "versions": "v", "commit": "c", "time": "t"}
    row = {"hidden": 8, "mode": "fwd", "provider": "p", **common.Timing(2.0, 1.0, 4.0).row(), "GB/s": 10.0}
    row["peak_mem_mb"] = 3.0
    ms, gbs, mem = common.csv_rows("op", [row], env, "float32")
    assert (ms["median"], ms["p20"], ms["p80"]) == ("2", "1", "4")
    assert (gbs["median"], gbs["p20"], gbs["p80"]) == ("10", "5", "20")  # 20 GB/s at the fast end (1 ms)
    assert (mem["p20"], mem["p80"]) == ("", "")
    assert ms["shape"] == "hidden=8"


def test_bench_stats_quantiles_are_ordered():
    t = common.bench_stats(lambda: sum(range(1000)))
    assert 0 < t.p20 <= t.median <= t.p80


def test_rotating_fills_the_budget_with_distinct_sets():
    budget, most = common.ring_budget()
    ring = common.rotating(lambda: torch.empty(1024, dtype=torch.uint8))
    assert len(ring) == most
    assert len({ring().data_ptr() for _ in range(len(ring))}) == len(ring)
    big = common.rotating(lambda: torch.empty(budget + 1, dtype=torch.uint8))
    assert len(big) == 1


def test_plot_draws_lines_and_bars(tmp_path):
    rows = [
        {"seqlen": s, "mode": m, "provider": p, **common.Timing(ms, 0.9 * ms, 1.1 * ms).row()}
        for m in ("fwd", "fwd+bwd")
        for s in (512, 1024)
        for p, ms in (("sdpa", 2.0), ("fastformer-triton", 1.0))
    ]
    rows.append({"seqlen": 64, "mode": "decode", "provider": "sdpa", "ms": 1.0})
    rows.append({"seqlen": 64, "mode": "decode", "provider": "fastformer-triton", "error": "x"})
    env = {"device": "CPU (test)"}
    png = tmp_path / "p.png"
    common.write_plot(png, "attention", rows, common.PlotSpec(x="seqlen", baseline=("sdpa",)), env, ["CPU run"])
    assert png.read_bytes().startswith(PNG)


def test_commit_is_never_empty(tmp_path, monkeypatch):
    assert common.commit() not in ("", "unknown")  # this checkout
    monkeypatch.setattr(common, "__file__", str(tmp_path / "common.py"))  # as if installed outside any checkout
    assert common.commit() == "unknown"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bench_help_lists_the_benchmarks(capsys, flag):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "fastformer bench NAME" in out and "--csv" in out and "--plot" in out
    for name in cli.BENCHES:
        assert f"  {name} " in out


def test_bench_name_help_shows_its_own_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "layer_norm", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "fastformer bench layer_norm" in out and "--p P" in out and "--csv" in out


def test_bench_without_a_name_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench"])
    assert e.value.code == 2
    assert "NAME is required" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs in its interpreter only without a GPU")
def test_interpreted_rows_are_marked_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTFORMER_BACKEND", "triton")
    rows = [{"provider": p, "ms": 1.0} for p in ("fastformer-triton", "fastformer-torch", "fastformer", "torch")]
    notes = common.cpu_notes(rows)
    marked = ["fastformer-triton (interpreter)", "fastformer-torch", "fastformer (interpreter)", "torch"]
    assert [r["provider"] for r in rows] == marked
    assert "interpreter" in notes[0] and "CPU" in notes[0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "interpreter" not in common.cpu_notes([{"provider": "fastformer-triton", "ms": 1.0}])[0]


def test_bench_all_gives_each_benchmark_its_own_files(monkeypatch):
    calls = {}

    def fake_import(name):
        bench = name.removeprefix("fastformer.benchmarks.bench_")
        return type("Bench", (), {"main": staticmethod(lambda argv: calls.setdefault(bench, argv))})

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    cli.bench("all", ["--quick", "--csv", "out/r.csv", "--plot=r.png"])
    assert len(calls) == len(cli.BENCHES)
    assert calls["layer_norm"] == ["--quick", "--csv", "out/r.layer_norm.csv", "--plot=r.layer_norm.png"]
    assert calls["hf"] == ["--quick", "--csv", "out/r.hf.csv", "--plot=r.hf.png"]
