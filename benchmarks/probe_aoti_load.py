"""Issue 5's crash, narrowed: which AOTInductor package loads in a fresh process, by how its
library was linked and by what the loading process preloads.

Builds a plain nn.Linear + ReLU package (torch alone, no fxquant op) once per link mode, then
loads each with `aoti_load_package` in fresh processes under several preload settings, and
prints one line per pair: the exit status, and for a crash under the "segv" setting the last
native frames (`scripts/segv_backtrace.c`).

    python benchmarks/probe_aoti_load.py WORKDIR [--devices cuda,cpu]

WORKDIR must hold `segv.so` (gcc -shared -fPIC -O1 scripts/segv_backtrace.c -o WORKDIR/segv.so)
for the "segv" setting. `--packages` loads packages an earlier run built (kept from its WORKDIR)
instead of building: on the GPU machine a build takes minutes, a load seconds.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import torch
import torch.nn as nn
from torch.export import Dim

LOADER = textwrap.dedent("""
    import sys
    if sys.argv[3] == "ctypes":
        import ctypes
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    import torch
    pkg, device = sys.argv[1:3]
    model = torch._inductor.aoti_load_package(pkg)
    print("LOADED", flush=True)
    x = torch.randn(5, 64, device=device)
    with torch.no_grad():
        y = model(x)
    torch.save((x.cpu(), y.cpu()), pkg + ".out")
    print("RAN_OK", flush=True)
""")


def wrapper(workdir: str, mode: str) -> str | None:
    """The compiler for a link mode. "default": Inductor's own (None); "fxquant": fxquant.export's
    current link wrapper (around Inductor's compiler); the others wrap the first g++ on PATH,
    not Inductor's compiler (on the GPU machine /usr/bin/g++, which links the shared libstdc++,
    where Inductor's is /opt/gcc/bin/g++), adding their link flags to the shared-library link."""
    if mode == "default":
        return None
    real = shutil.which("g++")
    if mode == "symbolic":
        extra = "-Wl,-Bsymbolic"
    elif mode == "hidden":  # export only the C entry points the loader looks up
        vs = os.path.join(workdir, "aoti.map")
        with open(vs, "w") as f:
            f.write("{ global: AOTInductor*; local: *; };\n")
        extra = f"-Wl,--version-script={vs}"
    elif mode == "static":
        extra = "-static-libstdc++ -static-libgcc"
    elif mode == "fxquant":  # what fxquant.export links with
        from fxquant.export import link_wrapper_cxx
        return link_wrapper_cxx()
    else:
        raise ValueError(mode)
    path = os.path.join(workdir, mode, "g++")  # Inductor picks flags by the compiler's name
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                f'case " $* " in *" -shared "*) exec {shlex.quote(real)} "$@" {extra} ;; '
                f'*) exec {shlex.quote(real)} "$@" ;; esac\n')
    os.chmod(path, 0o755)
    return path


def build(workdir: str, device: str, mode: str) -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU()).to(device).eval()
    x = torch.randn(4, 64, device=device)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    cxx = wrapper(workdir, mode)
    path = os.path.join(workdir, f"plain_{device}_{mode}.pt2")
    return torch._inductor.aoti_compile_and_package(
        ep, package_path=path, inductor_configs={"cpp.cxx": cxx} if cxx else {})


SETTINGS = {  # name: (LD_PRELOAD entries, python flags); "+segv" adds the native-stack handler
    "bare": ([], []),
    "faulthandler": ([], ["-X", "faulthandler"]),
    "segv": (["segv"], []),
    "preload-libstdc++": (["libstdc++"], []),
    "ctypes": ([], []),  # the loader script preloads libstdc++ RTLD_GLOBAL before importing torch
    "ctypes+faulthandler": ([], ["-X", "faulthandler"]),
}


def load(workdir: str, pkg: str, device: str, setting: str) -> str:
    libstdcxx = subprocess.run(["g++", "-print-file-name=libstdc++.so.6"], capture_output=True,
                               text=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    names, flags = SETTINGS[setting]
    pre = [{"segv": os.path.join(workdir, "segv.so"), "libstdc++": libstdcxx}[n] for n in names]
    if pre:
        env["LD_PRELOAD"] = " ".join(pre)
    mode = "ctypes" if setting.startswith("ctypes") else "-"
    proc = subprocess.run([sys.executable, *flags, "-c", LOADER, pkg, device, mode], env=env,
                          capture_output=True, text=True, errors="replace", timeout=300)
    if proc.returncode == 0 and "RAN_OK" in proc.stdout:
        return "ok"
    stage = "running" if "LOADED" in proc.stdout else "loading"
    frames = [ln for ln in proc.stderr.splitlines() if "(" in ln and "[0x" in ln][:14]
    tail = "\n      ".join(frames) if frames else proc.stderr.strip()[-600:]
    return f"rc {proc.returncode} while {stage}\n      {tail}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--modes", default="default,symbolic,hidden,static")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--packages", default="", help="load these .pt2 files (comma-separated) instead of building")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, g++ {subprocess.run(['g++', '-dumpfullversion'], capture_output=True, text=True).stdout.strip()}")
    results = []
    jobs = []  # (device, link mode, package)
    if args.packages:
        for pkg in args.packages.split(","):  # named plain_{device}_{mode}.pt2 by build()
            _, device, mode = os.path.basename(pkg)[:-4].split("_", 2)
            jobs.append((device, mode, pkg))
    else:
        for device in args.devices.split(","):
            for mode in args.modes.split(","):
                t0 = time.time()
                try:
                    jobs.append((device, mode, build(args.workdir, device, mode)))
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"{device} {mode}: build failed: {type(e).__name__}: {str(e)[-400:]}", flush=True)
                    continue
                print(f"{device} {mode}: built in {time.time() - t0:.0f} s", flush=True)
    for device, mode, pkg in jobs:
        for setting in args.settings.split(","):
            t0 = time.time()
            r = load(args.workdir, pkg, device, setting)
            results.append((device, mode, setting, r.split("\n")[0]))
            print(f"{device:4} link={mode:8} load={setting:19} {r}  ({time.time() - t0:.0f} s)", flush=True)
    print("\nsummary")
    for device, mode, setting, r in results:
        print(f"{device:4} link={mode:8} load={setting:19} {r}")


if __name__ == "__main__":
    main()
