"""memfit side by side with llama.cpp's quantized KV cache, on the same GGUF and byte-identical prompts.

llama.cpp runs through llama-cpp-python, built from source in its own venv (no torch there). A
native build uses AMX where the CPU has it and crashes at its first decode there, and a build for
AVX-512 stops with an illegal instruction on a CPU without it, so the build names the instruction
sets this CPU has (:func:`cmake_args`). This script (run with memfit's venv) writes the samples as
memfit's own token ids, runs benchmarks/llamacpp_worker.py in that venv for each KV-cache type
(``--types f16,q8_0,q4_0``; flash attention on), and leaves llama.cpp's records beside memfit's, so
that `memfit plot DIR` draws both and `memfit eval --summary`-style tables compare accuracy relative
to each side's own 16-bit cache.

    .venv/bin/python benchmarks/peer_llamacpp.py --out results/eval --length 4096 --samples 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from memfit.models import cpu_flags, resolve_model
from peer_common import add_sample_args, write_samples

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-llamacpp"
VERSION = "0.3.36"
# ggml's CPU instruction sets, each enabled only where this CPU has it, AMX always off: a native
# build (-DGGML_NATIVE=ON) uses AMX where it exists and crashes at its first decode on such CPUs
FLAGS = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX512", "avx512_vnni": "AVX512_VNNI",
         "avx512_bf16": "AVX512_BF16"}


def cmake_args(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """CMAKE_ARGS for a llama.cpp build that runs on this CPU."""
    have = cpu_flags(cpuinfo) or set()
    on = " ".join(f"-DGGML_{name}={'ON' if flag in have else 'OFF'}" for flag, name in FLAGS.items())
    return (f"-DGGML_NATIVE=OFF {on} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "
            "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF")


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    # initialising the backend runs the CPU code: a build for instructions this CPU lacks stops here
    check = [str(py), "-c", "import llama_cpp; llama_cpp.llama_backend_init()"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    print(f"creating {venv}: llama-cpp-python=={VERSION} built from source (tens of minutes on 2 cores)",
          file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": cmake_args(), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--force-reinstall", "--no-cache-dir", "--no-binary",
                    "llama-cpp-python", f"llama-cpp-python=={VERSION}"], check=True, env=env)
    if subprocess.run(check, capture_output=True).returncode:
        raise SystemExit(f"llama.cpp built in {venv} does not run on this CPU (CMAKE_ARGS={env['CMAKE_ARGS']})")
    return py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(ap)
    ap.add_argument("--types", default="f16,q8_0,q4_0", help="llama.cpp KV-cache types, K and V alike")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    source = resolve_model(args.model)
    if not source.gguf_file:
        raise SystemExit(f"llama.cpp reads GGUF files; {args.model!r} resolves to a folder without one "
                         f"({source.folder})")
    sample_file = write_samples(args, "llamacpp_samples.json")
    py = ensure_venv(VENV)
    cmd = [str(py), str(ROOT / "benchmarks" / "llamacpp_worker.py"), "--samples", str(sample_file),
           "--gguf", str(Path(source.folder) / source.gguf_file), "--types", args.types,
           "--threads", str(args.threads), "--out", str(args.out / "llamacpp.jsonl")]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if res.returncode:
        why = " (illegal instruction: the build uses instructions this CPU lacks; delete " \
              f"{VENV} to rebuild)" if res.returncode in (132, -4) else ""
        print(f"llama.cpp worker failed with exit code {res.returncode}{why}", file=sys.stderr)
        return res.returncode
    report = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else {}
    for label, why in report.get("skipped", {}).items():
        print(f"skipped {label}: {why}", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
