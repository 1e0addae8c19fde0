"""Session 11's crash, narrowed: a TORCH_CHECK whose message streams an integer, thrown from a
JIT-built extension, ended the process with SIGSEGV on the GPU machine. Builds the same
three-line extension with no extra link flag, with `-lstdc++` and with `-l:libstdc++.so.6`, calls it in a fresh
process each, and prints whether the error came back as a Python exception, with the
extension's libstdc++ linkage (NEEDED entry, libstdc++ code linked in).

    python benchmarks/probe_cxx_error.py WORKDIR
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SRC = textwrap.dedent("""
    #include <torch/extension.h>
    int64_t check(int64_t v) { TORCH_CHECK(v < 0, "value ", v, " is not negative"); return v; }
    TORCH_LIBRARY(NAMESPACE, m) { m.def("check(int v) -> int", &check); }
""")

CALL = textwrap.dedent("""
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    try:
        getattr(torch.ops, sys.argv[2]).check(7)
    except RuntimeError as e:
        print("RAISED:", str(e).splitlines()[0])
""")


def main() -> None:
    work = sys.argv[1]
    from torch.utils import cpp_extension
    for name, ldflags in (("plain", []), ("lstdcxx", ["-lstdc++"]), ("sofile", ["-l:libstdc++.so.6"])):
        d = os.path.join(work, name)
        os.makedirs(d, exist_ok=True)
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write(SRC.replace("NAMESPACE", f"probe_err_{name}"))
        cpp_extension.load(name=f"probe_err_{name}", sources=[src], extra_ldflags=ldflags,
                           build_directory=d, is_python_module=False, verbose=False)
        so = os.path.join(d, f"probe_err_{name}.so")
        needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True).stdout
        syms = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True).stdout
        proc = subprocess.run([sys.executable, "-c", CALL, so, f"probe_err_{name}"], capture_output=True, text=True)
        got = proc.stdout.strip() or f"rc {proc.returncode}"
        print(f"{name:8} libstdc++ NEEDED: {'libstdc++' in needed}, locale code linked in: "
              f"{' T _ZNKSt6locale2id5_M_idEv' in syms}, call: {got}", flush=True)


if __name__ == "__main__":
    main()
