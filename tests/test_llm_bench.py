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
                assert (m["matched"], m["checked"], m["text"]) == (8, 8, "match 8/8"), where
                # float32 on CPU: the compiled model computes what the eager reference computes,
                # up to float32 rounding (measured ~1e-7 against logits of ~0.5).
                assert m["max_abs_logit_diff"] < 1e-4 * m["ref_logit_scale"] + 1e-6, where
