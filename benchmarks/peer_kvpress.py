"""memfit side by side with NVIDIA's kvpress, on the same task samples and byte-identical prompts.

kvpress pins transformers<5.3, so it gets its own venv (torch==2.13.0 first, then kvpress); this
script (run with memfit's venv) writes the samples, runs benchmarks/kvpress_worker.py in that venv,
and leaves kvpress's records beside memfit's, so that `memfit plot DIR` draws both on one chart.

    .venv/bin/python benchmarks/peer_kvpress.py --out results/eval --length 2048 --samples 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from memfit.models import resolve_model
from peer_common import add_sample_args, write_samples

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-kvpress"


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import kvpress, gguf"], capture_output=True).returncode == 0:
        return py
    print(f"creating {venv} (torch==2.13.0 first, then kvpress==0.5.5)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["kvpress==0.5.5", "gguf", "accelerate", "protobuf", "sentencepiece"], check=True)
    return py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(ap)
    ap.add_argument("--presses", default="streaming_llm,snapkv,expected_attention,knorm,tova,pyramidkv,kvzip")
    ap.add_argument("--ratios", default="0.75,0.875")
    args = ap.parse_args()

    sample_file = write_samples(args, "kvpress_samples.json")
    source = resolve_model(args.model)
    py = ensure_venv(VENV)
    cmd = [str(py), str(ROOT / "benchmarks" / "kvpress_worker.py"), "--samples", str(sample_file),
           "--model-dir", str(source.folder), "--presses", args.presses, "--ratios", args.ratios,
           "--out", str(args.out / "kvpress.jsonl")]
    if source.gguf_file:
        cmd += ["--gguf-file", source.gguf_file]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    report = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else {}
    (args.out / "kvpress_skipped.json").write_text(json.dumps(report, indent=1))
    for label, why in report.get("skipped", {}).items():
        print(f"skipped {label}: {why}", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
