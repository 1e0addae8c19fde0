"""benchmarks/llm.py end to end on CPU, on its tiny float32 Llama: it runs, writes its JSON, compiles
nothing while timing, and each fxquant scheme's greedy tokens equal those of the eager model on the
same quantized weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--tiny", "--device", "cpu", "--prompt", "8", "--new-tokens", "8", "--batches", "1,2", "--prefill", "16",
        "--repeats", "2"]
# Two processes, so the two fxquant schemes compile on both cores (each compiles 5 graphs).
GROUPS = {"a": ["bf16-eager", "int8wo"], "b": ["int8dyn"]}
FXQUANT = {"int8wo", "int8dyn"}


def test_llm_bench_tiny_cpu(tmp_path):
    procs = {}
    for key, schemes in GROUPS.items():
        cmd = [sys.executable, str(ROOT / "benchmarks" / "llm.py"), *ARGS, "--schemes", ",".join(schemes),
               "--out", str(tmp_path / key)]
        procs[key] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
    logs = {key: p.communicate(timeout=600)[0] for key, p in procs.items()}
    for key, p in procs.items():
        assert p.returncode == 0, logs[key][-3000:]

    for key, schemes in GROUPS.items():
        out = tmp_path / key
        assert (out / "llm_table.txt").exists() and (out / "llm.png").exists(), logs[key][-2000:]
        assert (out / "llm_forced.png").exists(), logs[key][-2000:]  # its fxquant schemes ran the forced check
        data = json.loads((out / "llm.json").read_text())
        assert [r["scheme"] for r in data["results"]] == schemes
        for r in data["results"]:
            where = f"{r['scheme']}: {json.dumps(r)[:1500]}\n{logs[key][-2000:]}"
            assert r["status"] == "ok", where
            assert set(r["decode_tok_s"]) == {"1", "2"} and all(v > 0 for v in r["decode_tok_s"].values()), where
            assert r["prefill_tok_s"] > 0, where
            assert r["frames_compiled_timed"] == 0, where
            assert r["graph_breaks"] == 0, where
            assert r["deterministic"], where
            if r["scheme"] in FXQUANT:
                assert r["frames_compiled_warmup"] > 0, where
                assert r["linears_compiled_quantized"] == r["linears_quantized"] == 15, where  # 2 x 7 + lm_head
                m = r["token_match"]
                assert (m["matched"], m["checked"]) == (8, 8) and m["text"].startswith("match 8/8; forced 8/8; "), where
                f = r["token_match_forced"]  # fed the reference's tokens: every step's argmax agrees
                assert (f["agree"], f["checked"], f["gap_ulps_at_disagreements"]) == (8, 8, []), where
                # its logits are the reference's up to float32 rounding; quantizing itself moved them far more
                assert all(d is None or d > 100 for d in f["logit_sqnr_db"]), where  # None: identical
                assert 20 < f["quantization_sqnr_db_step0"] < 80, where
                # float32 on CPU: the compiled model computes what the eager reference computes,
                # up to float32 rounding (measured ~1e-7 against logits of ~0.5).
                assert m["max_abs_logit_diff"] < 1e-4 * m["ref_logit_scale"] + 1e-6, where


def test_forced_agreement_reports_the_gap_of_each_disagreement():
    """Teacher-forced check: steps whose argmax differs from the reference's are listed with the
    reference's top-2 gap in ulps of the model dtype (bf16 ulp at 4.0 is 1/32), and how many of all
    steps were that close a call."""
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import llm
    logits = torch.tensor([[4.0, 3.0, 0.0], [4.0, 4.0 - 1 / 32, 0.0], [0.0, 1.0, 4.0]])
    ref = {"tokens": logits.argmax(-1)[None], "logits": logits}
    same = llm.forced_agreement(torch.tensor([0, 0, 2]), ref, torch.bfloat16)
    assert (same["agree"], same["gap_ulps_at_disagreements"], same["text"]) == (3, [], "forced 3/3")
    off = llm.forced_agreement(torch.tensor([0, 1, 1]), ref, torch.bfloat16)
    assert off["agree"] == 1 and off["gap_ulps_at_disagreements"] == [1.0, 96.0]
    assert off["text"] == "forced 1/3 (ref gaps 1, 96 ulp; 3/3 steps within 96 ulp)"
    assert off["gap_ulps_every_step"] == [32.0, 1.0, 96.0] and off["disagree_steps"] == [1, 2]
    near = llm.forced_agreement(torch.tensor([0, 1, 2]), ref, torch.bfloat16)
    assert near["text"] == "forced 2/3 (ref gaps 1 ulp; 1/3 steps within 1 ulp)"
    # with the scheme's logits: their SQNR against the reference's, and the quantization's own at step 0
    ref["unquantized_logits0"] = torch.tensor([4.0, 3.0, 1.0])  # noise 1 / 3 against 26 / 3: 14.1 dB
    noisy = logits.clone()
    noisy[2, 2] = 4.4  # noise 0.16 / 3 against 17 / 3: 20.3 dB
    got = llm.forced_agreement(torch.tensor([0, 0, 2]), ref, torch.bfloat16, noisy)
    assert got["logit_sqnr_db"][:2] == [None] * 2 and abs(got["logit_sqnr_db"][2] - 20.27) < 0.01  # None: identical
    assert got["text"] == "forced 3/3; logits vs ref min 20.3 dB (step 0 inf; the quantization itself 14.1)"
    del ref["unquantized_logits0"]  # an unquantized scheme (bf16-inductor): no quantization to compare with
    got = llm.forced_agreement(torch.tensor([0, 0, 2]), ref, torch.bfloat16, noisy)
    assert "quantization_sqnr_db_step0" not in got and got["text"] == "forced 3/3; logits vs ref min 20.3 dB"
    # a negative top logit at a power of two: the gap counts in ulps of |top1| (1/64 at 2.0)
    neg = {"tokens": torch.tensor([[0]]), "logits": torch.tensor([[-2.0, -2.0 - 1 / 64]])}
    assert llm.forced_agreement(torch.tensor([0]), neg, torch.bfloat16)["gap_ulps_every_step"] == [1.0]
