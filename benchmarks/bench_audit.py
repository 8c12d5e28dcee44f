"""Audit throughput and memory at scale: does `amg audit` stay bounded as the file count grows?

Writes ``--files`` short FLAC files (the default training clips with a random gain, offset and a
little noise, so every file is different) into a scratch folder, audits them against the bundled
index in a fresh subprocess per size, and prints files/s and the subprocess's peak resident memory
for each size, with the ratio of the largest size's peak memory to the smallest's (bounded memory:
a ratio near 1 while the file count grows several-fold). One JSON line per size is appended to
benchmarks/results.jsonl.

    python benchmarks/bench_audit.py --files 2000 8000        # ~N/150 s of synthesis, then the audits
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_common import ROOT, append_record, environment  # noqa: E402

CHILD = """
import json, resource, sys, time
from pathlib import Path
from amg_engine.engine.engine import DEFAULT_INDEX_DIR
from amg_engine.jobs.audit import AuditConfig, run_audit
start = time.perf_counter()
cfg = AuditConfig(batch_size=256, pairs=8)
s = run_audit(sys.argv[1], DEFAULT_INDEX_DIR, sys.argv[2], cfg, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "n_ok": s.n_ok,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def synthesize(folder: Path, n: int, seed: int = 0) -> None:
    """n different 1 s FLAC files derived from the training clips (in sub-folders of 1,000)."""
    import numpy as np
    import soundfile as sf

    from amg_engine.engine.default.data import SAMPLE_RATE, make_clips

    clips, rng = make_clips(), np.random.default_rng(seed)
    for i in range(n):
        base = clips[i % len(clips)].audio
        x = np.roll(base, int(rng.integers(0, 400))) * rng.uniform(0.3, 1.0)
        x = (x + rng.normal(0, 0.01, x.shape)).astype(np.float32)
        path = folder / f"{i // 1000:04d}" / f"gen-{i:07d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.clip(x, -1, 1), SAMPLE_RATE)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, nargs="+", default=[2000, 8000], help="file counts to audit")
    p.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a temporary one)")
    log = ROOT / "benchmarks" / "results.jsonl"
    p.add_argument("--results", type=Path, default=log, help="JSON lines log")
    args = p.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench-audit-"))
    rows = []
    for n in sorted(args.files):
        src, out = scratch / f"files-{n}", scratch / f"audit-{n}"
        t0 = time.perf_counter()
        synthesize(src, n)
        synth = time.perf_counter() - t0
        res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], cwd=ROOT, capture_output=True,
                             text=True, check=True)  # fmt: skip
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append((n, r))
        print(f"{n:>8d} files: {r['n_ok'] / r['seconds']:7.1f} files/s ({r['seconds']:.1f} s; synthesis "
              f"{synth:.0f} s), peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
        append_record(args.results, {
            "bench": "audit", "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **environment("cpu"), "files": n, **r,
        })  # fmt: skip
    if len(rows) > 1:
        (n0, a), (n1, b) = rows[0], rows[-1]
        print(
            f"{n1 / n0:.0f}x the files: peak memory x{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}, "
            f"throughput x{(b['n_ok'] / b['seconds']) / (a['n_ok'] / a['seconds']):.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
