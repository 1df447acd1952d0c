"""Import and export of a ~500M-parameter checkpoint: seconds and peak RSS against the file size.

    python -m lab.benchmarks.hf_io                 # writes the checkpoints once under --dir, then times
    python -m lab.benchmarks.hf_io --rounds 3

Modes, each in a fresh interpreter so its peak RSS (`ru_maxrss`) is its own:
- floor: python, torch and lab imported, nothing loaded (what every mode pays anyway);
- import: `load_hf` of a Hugging Face folder in bf16 (as checkpoints are published), into fp32 weights;
- export: read lab's own checkpoint (fp32) and write a Hugging Face folder in bf16.
The model is random (Llama-shaped, untied, 32k vocabulary); a loaded model of N parameters holds
4N bytes in fp32, so "two full copies" would show as about 8N bytes above the floor. The peak
includes the pages of the memory-mapped file being read (page cache, counted in RSS while mapped);
"resident after" is the RSS once the file is closed: the weights and what they were written to.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.benchmarks.harness import peak_rss_mib

MODEL = dict(name="bench500m", dim=1536, n_layers=16, n_heads=12, n_kv_heads=4, ffn_dim=4096,
             tie_embeddings=False, max_seq_len=2048)
VOCAB = 32000


def prepare(directory: Path) -> None:
    """Write the lab checkpoint and the HF folder once (random weights, seeded)."""
    import torch

    from lab import checkpoint as ckpt
    from lab.config import ModelConfig
    from lab.formats.hf_export import write_hf_model
    from lab.models import build_model
    from lab.tokenizers import ByteTokenizer

    if (directory / "lab" / "meta.json").exists() and (directory / "hf" / "config.json").exists():
        return
    torch.manual_seed(0)
    model = build_model(ModelConfig(**MODEL), VOCAB)
    tok = ByteTokenizer()
    ckpt.write_export(directory / "lab", model.state_dict(), model, tok, {"step": 0, "tokenizer_sha256": tok.sha256})
    shutil.rmtree(directory / "hf", ignore_errors=True)
    write_hf_model(directory / "hf", model.state_dict(), model.config, VOCAB, tok, 2**31, dtype="bfloat16")


def run_mode(mode: str, directory: Path) -> dict:
    """One measurement, in this (fresh) interpreter."""
    import torch  # noqa: F401  (the floor includes it)

    from lab import lineage
    from lab.formats.hf import load_hf
    from lab.formats.hf_export import write_hf_model

    start = time.perf_counter()
    if mode == "import":
        model, _ = load_hf(directory / "hf")
        n = model.num_parameters()
    elif mode == "export":
        pre = lineage._read(directory / "lab")
        model = pre.build()
        n = model.num_parameters()
        with tempfile.TemporaryDirectory(dir=directory) as out:
            write_hf_model(Path(out), model.state_dict(), model.config, pre.vocab_size,
                           pre.tokenizer(), 2**31, dtype="bfloat16")
            seconds = time.perf_counter() - start
            return {"mode": mode, "seconds": seconds, "peak_mib": peak_rss_mib(), "after_mib": rss_mib(), "params": n}
    else:
        n = 0
    return {"mode": mode, "seconds": time.perf_counter() - start, "peak_mib": peak_rss_mib(), "after_mib": rss_mib(),
            "params": n}


def rss_mib() -> float:
    """Resident memory now (Linux's VmRSS)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lab_hf_io")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child, args.dir)))
        return
    prepare(args.dir)
    rows: dict[str, list[dict]] = {m: [] for m in ("floor", "import", "export")}
    for _ in range(args.rounds):  # interleaved, so drift hits every mode alike
        for mode in rows:
            out = subprocess.run([sys.executable, "-m", "lab.benchmarks.hf_io", f"--dir={args.dir}", f"--child={mode}"],
                                 check=True, capture_output=True, text=True).stdout
            rows[mode].append(json.loads(out.strip().splitlines()[-1]))
    mib = lambda folder, pattern: sum(f.stat().st_size for f in (args.dir / folder).glob(pattern)) / 2**20  # noqa: E731
    files = {"import": mib("hf", "*.safetensors"), "export": mib("lab", "*.safetensors")}
    floor = statistics.median(r["peak_mib"] for r in rows["floor"])
    n = rows["import"][0]["params"]
    print(f"{n / 1e6:.0f}M parameters (fp32 in memory: {n * 4 / 2**20:,.0f} MiB); median of {args.rounds} "
          f"fresh processes each; peak RSS floor (python + torch + lab) {floor:,.0f} MiB")
    weights = n * 4 / 2**20
    print("| mode | reads | seconds | peak RSS MiB (/ fp32 weights, above floor) | resident after MiB (/ weights) |")
    print("|---|---|---|---|---|")
    for mode, label in (("import", "HF folder, bf16"), ("export", "lab checkpoint, fp32; writes HF bf16")):
        peak, after, seconds = (statistics.median(r[k] for r in rows[mode]) for k in ("peak_mib", "after_mib", "seconds"))
        print(f"| {mode} | {label}, {files[mode]:,.0f} MiB | {seconds:.1f} | {peak:,.0f} ({(peak - floor) / weights:.2f}) "
              f"| {after:,.0f} ({(after - floor) / weights:.2f}) |")


if __name__ == "__main__":
    main()
