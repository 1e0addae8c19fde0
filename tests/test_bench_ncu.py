"""benchmarks/ncu_kernels.py's parser: ncu's CSV cut back into points at the marker kernels."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


@pytest.fixture(scope="module")
def ncu():
    spec = importlib.util.spec_from_file_location("fxq_bench_ncu", BENCH / "ncu_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(kid, name, metric, unit, value):
    return (f'"{kid}","1","python","h","{name}","1","7","(128, 1, 1)","(4, 1, 1)","0","9.0",'
            f'"GPU Speed Of Light Throughput","{metric}","{unit}","{value}"')


def _profile(tmp_path, kernels):
    lines = ["==PROF== Disconnected from process 1", HEADER]
    for kid, (name, us_value, unit) in enumerate(kernels):
        lines += [_row(kid, name, "Duration", unit, us_value), _row(kid, name, "DRAM Throughput", "%", "50.5")]
    path = tmp_path / "prof.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_points_split_at_markers_with_units_and_ratio_to_bf16(ncu, tmp_path):
    prof = _profile(tmp_path, [("spin_kernel(long)", "1.00", "us"), ("quant_kernel", "1,500.00", "nsecond"),
                               ("gemm_kernel", "6.5", "usecond"),
                               ("(anonymous namespace)::spin_kernel(long)", "1", "us"),
                               ("nvjet_sm90", "0.016", "msecond")])
    points = tmp_path / "points.txt"
    points.write_text("warm-up noise\npoint 0: w8a8_int8 4096x4096 M=16 weight_bytes=16000000\n"
                      "point 1: bf16 4096x4096 M=16 weight_bytes=32000000\n")
    text = ncu.report(ncu.read_kernels(prof), ncu.read_points(points))
    assert "| w8a8_int8 | 4096x4096 | 16 | quant_kernel | 1.50 | 50.5 |" in text
    assert "| w8a8_int8 | 4096x4096 | 16 | 2 | 8.00 | 2.00 |  | 2.00 |" in text  # 16 us bf16 / 8 us
    assert "| bf16 | 4096x4096 | 16 | 1 | 16.00 | 2.00 |  |  |" in text
    assert "spin" not in text


def test_a_partial_profile_gives_its_points_and_an_overfull_one_is_refused(ncu, tmp_path, capsys):
    prof = _profile(tmp_path, [("spin_kernel", "1", "us"), ("gemm_kernel", "2", "us")])
    points = tmp_path / "points.txt"
    points.write_text("point 0: bf16 64x64 M=1 weight_bytes=8192\npoint 1: bf16 64x64 M=2 weight_bytes=8192\n")
    text = ncu.report(ncu.read_kernels(prof), ncu.read_points(points))  # a --budget-s run: point 0 only
    assert "| bf16 | 64x64 | 1 | 1 | 2.00 |" in text and "| 64x64 | 2 |" not in text
    assert "1 of 2 points were profiled" in capsys.readouterr().err
    points.write_text("point 0: bf16 64x64 M=1 weight_bytes=8192\n")
    prof = _profile(tmp_path, [("spin_kernel", "1", "us"), ("gemm_kernel", "2", "us"), ("spin_kernel", "1", "us")])
    with pytest.raises(SystemExit, match="2 marker kernels in the profile but 1 points"):
        ncu.report(ncu.read_kernels(prof), ncu.read_points(points))


def test_odd_metric_values_do_not_stop_the_parse(ncu, tmp_path):
    prof = _profile(tmp_path, [("spin_kernel", "1", "us"), ("gemm_kernel", "n/a", "us"),
                               ("spin_kernel", "1", "us"), ("gemm_kernel", "0.000002", "second")])
    points = tmp_path / "points.txt"
    points.write_text("point 0: w8a16 64x64 M=1 weight_bytes=4096\npoint 1: bf16 64x64 M=1 weight_bytes=8192\n")
    text = ncu.report(ncu.read_kernels(prof), ncu.read_points(points))
    assert "| w8a16 | 64x64 | 1 | gemm_kernel | nan |" in text and "| bf16 | 64x64 | 1 | 1 | 2.00 |" in text


def test_kernels_are_grouped_by_kind_and_plotted(ncu, tmp_path):
    assert ncu.category("act_quant_kernel") == "activation quantization"
    assert ncu.category("void at::native::vectorized_elementwise_kernel<4, FillFunctor<int>>") == \
        "split-K counter memset"
    assert ncu.category("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>") == "GEMM / other"
    assert ncu.category("void cublasLt::splitKreduce_kernel<32, 16>") == "split-K reduce"
    assert ncu.category("dequant_kernel") == "weight dequantization"
    assert ncu.category("void cutlass::device_kernel<GemmUniversal>") == "GEMM / other"
    assert ncu.target("w4a16_g128", 1) == 3.0 and ncu.target("w8a8_int8", 4096) == 1.5
    assert ncu.target("fp8_row", 128) == 1.0 and ncu.target("bf16", 1) is None
    pytest.importorskip("matplotlib")
    prof = _profile(tmp_path, [("spin_kernel", "1", "us"), ("act_quant_kernel", "2", "us"), ("gemm_kernel", "6", "us"),
                               ("spin_kernel", "1", "us"), ("nvjet", "16", "us")])
    points = tmp_path / "points.txt"
    points.write_text("point 0: w8a8_int8 64x64 M=16 weight_bytes=4096\npoint 1: bf16 64x64 M=16 weight_bytes=8192\n")
    png = tmp_path / "k.png"
    assert ncu.main(["--parse", str(prof), "--points", str(points), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stall_table_from_the_raw_page(ncu, tmp_path):
    """--stalls: ncu's raw page (metric names, units, one row per kernel) cut at the markers; per kernel
    its time in the unit ncu gave, counters, and the largest stall reasons first."""
    names = ["Kernel Name", "gpu__time_duration.sum", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
             "smsp__issue_active.avg.pct_of_peak_sustained_active", "sm__warps_active.avg.pct_of_peak_sustained_active",
             "smsp__inst_executed.sum", "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
             "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
             "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio"]
    units = ["", "usecond", "%", "%", "%", "inst", "ratio", "ratio", "ratio"]
    rows = [["spin_kernel(long)", "1", "0", "1", "1", "10", "0", "0", "0"],
            ["int4_mma_kernel<bf16>", "7.5", "61.2", "48.9", "40.1", "1,024", "2.5", "0.25", "n/a"]]
    raw = tmp_path / "raw.csv"
    raw.write_text("==PROF== noise\n" + "\n".join(",".join(f'"{v}"' for v in r) for r in [names, units, *rows]) + "\n")
    points = tmp_path / "points.txt"
    points.write_text("point 0: w4a16_g128@cuda 4096x4096 M=1 weight_bytes=8912896\n")
    text = ncu.stall_table(ncu.read_raw(raw), ncu.read_points(points))
    assert ("| w4a16_g128@cuda 4096x4096 M=1 | int4_mma_kernel<bf16> | 7.50 | 61 | 49 | 40 | 1024 | "
            "long_scoreboard 2.50, barrier 0.25, math_pipe_throttle nan |") in text
    assert "spin" not in text
