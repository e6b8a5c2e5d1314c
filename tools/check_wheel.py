#!/usr/bin/env python3
"""Checks a built densenet_fast wheel the way a user would meet it.

    python tools/check_wheel.py dist/cpu/densenet_fast-0.1.0+cpu.torch2.14-....whl [--expect cpu|cuda]

1. Static: the wheel holds the extension and no torch/CUDA libraries (libtorch*.so, libc10*.so, ...);
   its version and local tag are reported.
2. Creates a *plain* virtual environment (no --system-site-packages, so nothing leaks in from the
   build environment), installs torch/torchvision into it, then the wheel.
3. In that venv, from a folder outside the source tree: imports densenet_fast (and checks it was
   imported from the venv), prints build_info(), and runs a small CPU parity check: the fused dense
   block vs torchvision's _DenseBlock (float64, forward and every gradient) and a DenseNet-BC with
   impl="fused" vs impl="reference" (train and eval).
4. CUDA wheels: build_info()["cuda"] must be true, the extension must carry device code for every
   requested arch (cuobjdump --list-elf, else the ELF names found by `strings`), and, where a GPU is
   present, the CUDA kernels must be registered and pass a parity check on the device.

Exit status 0 when every check passed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional

FORBIDDEN = re.compile(r"(^|/)lib(torch|c10|cudart|cublas|cudnn|cuda)[^/]*\.so")
EXTENSION = re.compile(r"^densenet_fast/_C[^/]*\.so$")

# Runs inside the fresh venv; prints one JSON line.
PROBE = r'''
import json, sys
import torch
import densenet_fast as dnf
from torchvision.models.densenet import _DenseBlock

def close(a, b, tol):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * (1 + float(b.abs().max()))

def block_parity(device, dtype, tol):
    torch.manual_seed(0)
    ref = _DenseBlock(3, 8, 4, 4, 0.0).to(device, dtype).train()
    fused = dnf.DenseBlock(3, 8, 4, 4, 0.0).to(device, dtype).train()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 6, 6, device=device, dtype=dtype)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 8 + 3 * 4, 6, 6, device=device, dtype=dtype)
    out_r, out_f = ref(xr), fused(xf)
    out_r.backward(g); out_f.backward(g)
    checks = {"output": close(out_f, out_r, tol), "grad_input": close(xf.grad, xr.grad, tol)}
    for (name, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters()):
        checks["grad " + name] = close(pf.grad, pr.grad, tol)
    for (name, br), (_, bf) in zip(ref.named_buffers(), fused.named_buffers()):
        if br.is_floating_point():
            checks["buffer " + name] = close(bf, br, tol)
    return checks

def model_parity(device):
    torch.manual_seed(0)
    fused = dnf.densenet_bc(depth=16, growth_rate=4, num_classes=5).to(device)
    ref = dnf.densenet_bc(depth=16, growth_rate=4, num_classes=5, impl="reference").to(device)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 16, 16, device=device)
    out_f, out_r = fused(x), ref(x)
    out_f.sum().backward(); out_r.sum().backward()
    checks = {"train logits": close(out_f, out_r, 1e-4),
              "train grads": all(close(a.grad, b.grad, 1e-3) for a, b in zip(fused.parameters(), ref.parameters()))}
    fused.eval(); ref.eval()
    with torch.no_grad():
        checks["eval logits"] = close(fused(x), ref(x), 1e-4)
    return checks

info = dnf.build_info()
result = {"module_file": dnf.__file__, "version": dnf.__version__, "build_info": info,
          "cpu": {**block_parity("cpu", torch.float64, 1e-9), **model_parity("cpu")}}
if torch.cuda.is_available() and info.get("cuda_kernels_registered"):
    result["cuda"] = {**block_parity("cuda", torch.float32, 1e-3), **model_parity("cuda")}
print("CHECK_RESULT " + json.dumps(result, default=str))
'''


def log(msg: str) -> None:
    print(f"[check_wheel] {msg}", flush=True)


def static_checks(wheel: Path) -> List[str]:
    """Problems found by looking inside the wheel (empty when none)."""
    names = zipfile.ZipFile(wheel).namelist()
    problems = [f"bundles {n} (torch/CUDA libraries must come from the torch install)"
                for n in names if FORBIDDEN.search(n)]
    exts = [n for n in names if EXTENSION.search(n)]
    if not exts:
        problems.append("no densenet_fast/_C*.so extension in the wheel")
    log(f"{wheel.name}: {len(names)} files, extension {exts[0] if exts else 'MISSING'}, "
        f"{'no' if not problems else 'PROBLEMS:'} bundled torch/CUDA libraries")
    return problems


def run(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


def make_venv(path: Path, python: str, torch_req: str, torchvision_req: str, wheel: Path) -> Path:
    """A plain venv (no system site-packages) with torch, torchvision and the wheel installed."""
    run([python, "-m", "venv", "--clear", str(path)])  # deliberately not --system-site-packages
    py = path / "bin" / "python"
    run([str(py), "-m", "pip", "install", "-q", torch_req, torchvision_req])
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)])
    run([str(py), "-m", "pip", "check"])  # the wheel's declared dependencies are satisfied
    return py


def probe(py: Path, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(py), "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    for line in proc.stdout.splitlines():
        if line.startswith("CHECK_RESULT "):
            return json.loads(line[len("CHECK_RESULT "):])
    raise RuntimeError(f"the import/parity probe failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")


def device_code_archs(so: Path) -> Optional[List[str]]:
    """sm_XX names of the device code in the extension, or None when no tool could tell."""
    cuobjdump = shutil.which("cuobjdump") or next(
        (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump",)
         if p.exists()), None)
    if cuobjdump:
        proc = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", str(so)], capture_output=True, text=True)
        if proc.returncode == 0:
            return sorted(set(re.findall(r"sm_\d+a?", proc.stdout)))
    strings = shutil.which("strings")
    if strings:
        proc = subprocess.run([strings, "-a", str(so)], capture_output=True, text=True)
        return sorted(set(re.findall(r"\bsm_\d+a?\b", proc.stdout)))
    return None


def expected_archs(arch_list: str) -> List[str]:
    """"8.0;8.6;9.0+PTX" -> ["sm_80", "sm_86", "sm_90"]."""
    return [f"sm_{a.replace('+PTX', '').replace('.', '')}" for a in re.split(r"[;, ]+", arch_list) if a]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel", type=Path, help="the .whl file to check")
    p.add_argument("--expect", choices=["auto", "cpu", "cuda"], default="auto",
                   help="wheel variant (auto: from the local version tag, +cuXYZ means CUDA; default %(default)s)")
    p.add_argument("--archs", default=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0+PTX"),
                   help="CUDA archs the extension must carry code for (CUDA wheels; default %(default)s)")
    p.add_argument("--python", default=sys.executable, help="interpreter that creates the venv (default %(default)s)")
    p.add_argument("--torch", default="torch==2.14.1", help="torch requirement for the venv (default %(default)s)")
    p.add_argument("--torchvision", default="torchvision==0.29.1",
                   help="torchvision requirement for the venv (default %(default)s)")
    p.add_argument("--venv", type=Path, help="venv folder (default: a temporary one, removed afterwards)")
    args = p.parse_args(argv)

    wheel = args.wheel.resolve()
    if not wheel.is_file():
        p.error(f"no such wheel: {wheel}")
    version = wheel.name.split("-")[1]
    expect = args.expect
    if expect == "auto":
        expect = "cuda" if re.search(r"\+cu\d+", version) else "cpu"
        if "+" not in version:
            log(f"version {version} has no local tag (+cpu... / +cuXYZ...): assuming --expect {expect}")
    problems = static_checks(wheel)

    tmp = Path(tempfile.mkdtemp(prefix="dnf-check-wheel-"))
    try:
        py = make_venv(args.venv or tmp / "venv", args.python, args.torch, args.torchvision, wheel)
        result = probe(py, tmp)
        log("build_info: " + json.dumps(result["build_info"]))
        module = Path(result["module_file"]).resolve()
        if not str(module).startswith(str((args.venv or tmp / "venv").resolve())):
            problems.append(f"densenet_fast was imported from {module}, not from the venv")
        for device in ("cpu", "cuda"):
            for name, ok in result.get(device, {}).items():
                if not ok:
                    problems.append(f"{device} parity: {name} differs")
            if device in result:
                log(f"{device} parity: {sum(result[device].values())}/{len(result[device])} checks passed")
        info = result["build_info"]
        if expect == "cuda":
            if not info.get("cuda"):
                problems.append("a CUDA wheel whose build_info()['cuda'] is false")
            so = next(module.parent.glob("_C*.so"))
            found = device_code_archs(so)
            want = expected_archs(args.archs)
            if found is None:
                problems.append("could not list the device code (no cuobjdump or strings)")
            else:
                log(f"device code in {so.name}: {', '.join(found) or 'none'} (expected {', '.join(want)})")
                problems += [f"no {a} device code in the extension" for a in want if a not in found]
            if info.get("cuda_available") and not info.get("cuda_kernels_registered"):
                problems.append("a GPU is present but the CUDA kernels are not registered")
            if not info.get("cuda_available"):
                log("no GPU here: CUDA parity not run (device code checked statically)")
        elif info.get("cuda"):
            problems.append("a CPU wheel built with CUDA kernels")
    finally:
        if args.venv is None:
            shutil.rmtree(tmp, ignore_errors=True)
    for problem in problems:
        log("FAIL: " + problem)
    log("PASS" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
