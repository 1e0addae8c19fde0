"""benchmarks/variants.py's --env settings: one or several NAME=VALUE assignments per setting."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def variants():
    sys.path.insert(0, str(BENCH))  # variants.py imports its neighbour linear.py
    try:
        spec = importlib.util.spec_from_file_location("fxq_bench_variants", BENCH / "variants.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def test_settings_of_one_and_several_assignments(variants):
    got = variants.parse_settings(["FXQUANT_CXX_INT4_VARIANT=2,8",
                                   "FXQUANT_CXX_INT4_KERNEL=rows;FXQUANT_CXX_INT4_ROWS=2,4,0", "A=x=y"])
    assert got == [("2,8", [("FXQUANT_CXX_INT4_VARIANT", "2,8")]),
                   ("rows;2,4,0", [("FXQUANT_CXX_INT4_KERNEL", "rows"), ("FXQUANT_CXX_INT4_ROWS", "2,4,0")]),
                   ("x=y", [("A", "x=y")])]  # a value may hold '='


@pytest.mark.parametrize("bad", ["NOEQUALS", "=1", "A=1;", "A=1;B"])
def test_a_malformed_setting_is_refused_by_name(variants, bad, capsys):
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        variants.parse_settings([bad])
    with pytest.raises(SystemExit) as e:  # the command line says which --env, before any GPU work
        variants.main(["--env", bad])
    assert e.value.code == 2 and repr(bad) in capsys.readouterr().err


def test_triton_op_rows_run_at_every_m_for_every_scheme(variants):
    """linear.py's <scheme>@triton_op rows (the embedded / exported kernels) are measured at every M,
    unlike the @cuda rows, which stop at the C++ kernels' M range."""
    lb = variants.LB
    for base in lb.SCHEMES:
        assert all(lb.variant_runs(f"{base}@triton_op", m) for m in (1, 16, 33, 4096))
    assert not lb.variant_runs("w4a16_g128@cuda", 4096)


@pytest.mark.parametrize("scheme", ["w4a16_g128", "w8a16", "w8a8_int8", "fp8_row", "fp8_tensor", "fp8_wo"])
def test_triton_op_rows_pass_the_command_line(variants, scheme, monkeypatch):
    """--schemes <scheme>@triton_op is accepted for every scheme and reaches the work (stubbed)."""
    lb = variants.LB
    seen = []
    monkeypatch.setattr(lb, "warm", lambda args: seen.append(args.schemes))
    assert lb.main(["--warm-only", "--peers", "none", "--schemes", f"{scheme}@triton_op", "--ms", "1"]) == 0
    assert seen == [[f"{scheme}@triton_op"]]


def test_triton_only_tuning_offers_triton_kernels_without_tma(variants):
    """--tune --triton-only (for the triton_op path) times only Triton GEMMs/GEMVs, as triton_ops.py
    launches them (no TMA), and refuses to run without --tune."""
    import argparse
    lb = variants.LB
    for scheme, group in (("int8_wo", 0), ("int4_wo", 128), ("fp8_dyn_row", 0)):
        for m in (1, 64, 4096):
            every = lb.tune_candidates(argparse.Namespace(triton_only=False), scheme, m, group)
            only = lb.tune_candidates(argparse.Namespace(triton_only=True), scheme, m, group)
            assert only and all(c.kind in ("gemm", "gemv", "deqgemm") and not c.tma for c in only)
            assert len(set(only)) == len(only)
            assert m < 4096 or {c.kind for c in every} - {"gemm", "gemv", "deqgemm"}  # deq, scaled_mm dropped
    with pytest.raises(SystemExit) as e:
        lb.main(["--triton-only", "--warm-only", "--peers", "none"])
    assert e.value.code == 2


def test_environment_sets_and_restores(variants, monkeypatch):
    monkeypatch.setenv("FXQ_TEST_KEEP", "old")
    monkeypatch.delenv("FXQ_TEST_NEW", raising=False)
    with variants.environment([("FXQ_TEST_KEEP", "new"), ("FXQ_TEST_NEW", "1")]):
        assert os.environ["FXQ_TEST_KEEP"] == "new" and os.environ["FXQ_TEST_NEW"] == "1"
    assert os.environ["FXQ_TEST_KEEP"] == "old" and "FXQ_TEST_NEW" not in os.environ
    with pytest.raises(RuntimeError):
        with variants.environment([("FXQ_TEST_KEEP", "x")]):
            raise RuntimeError
    assert os.environ["FXQ_TEST_KEEP"] == "old"


def test_deq_rows_force_dequantize_then_cublas_at_large_m(variants):
    """linear.py's <weight-only scheme>@deq rows force kind "deq" (dequantize, then cuBLAS), measured
    from M = 128 like the CUTLASS rows."""
    lb = variants.LB
    assert lb.VARIANTS["deq"].kind == "deq"
    assert [lb.variant_runs("w4a16_g128@deq", m) for m in (1, 64, 128, 4096)] == [False, False, True, True]
