"""Fault injection for ``amg generate``: what a night brings, on purpose, and what it lost.

Runs the real CLI in subprocesses on the bundled default model (``--no-amg --steps 4``, or the flags
given after ``--``) into one output folder, through these phases, the manifest growing by a few
batches before each so that every phase has work to interrupt:

1. ``kill``: SIGKILL at random moments of a run (after 1–3 new result shards and a random delay);
2. ``kill-merge``: SIGKILL inside the final compaction and ``results.parquet`` write (the merge is
   slowed in the child, 8-row chunks and 50 ms a chunk, so that a kill lands in it; the kill waits
   until a merge temporary file exists);
3. ``full-disk``: the disk fills while audio is written (a writer that raises ``OSError(ENOSPC)``
   after a random number of files), then during the merge (the Parquet writer of the compacted shard
   and of ``results.parquet`` raises ENOSPC): each must exit with code 4 and one line;
4. ``second-run``: two identical unsharded runs started together: one must exit with code 5;
5. ``truncate``: a result shard not yet merged is cut in half (its rows must be regenerated), and
   after a merge the compacted shard is cut in half (its rows recovered from results.parquet);
6. a plain rerun of the same command, which must exit 0.

Then it checks the folder: one ``ok`` result per manifest row, in order; every audio file decodes,
has the row's length and the recorded SHA-256; nothing else in ``audio/``; no temporary file
anywhere. It prints each phase's exit codes, the rows the engine generated (each child appends the
ids of every batch the engine returns; a row counts twice when its batch was in flight at a kill or
a fault, or its shard was cut before its merge) and ``lost`` (rows without a proven result; must be
0). Exit status 1 when anything was lost.

    python benchmarks/fault_inject.py                          # 48 rows, 4 kills, 3 merge kills
    python benchmarks/fault_inject.py --rows 200 --kills 14 --merge-kills 7 --seed 1
    python benchmarks/fault_inject.py -- --model DIR --index DIR --steps 8   # other engine flags
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The child: the CLI, with a fault installed first (AMG_FAULT).
CHILD = r"""
import errno, os, sys, time
fault = os.environ.get("AMG_FAULT", "")

def enospc(where):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

if fault.startswith("enospc-audio:"):  # the disk fills after this many audio files
    import amg_engine.jobs.results as r
    limit, count, real = int(fault.split(":")[1]), [0], r.atomic_write
    def atomic_write(path, write, tmp=None, durable=True):
        count[0] += 1
        if count[0] > limit:
            def write(p):
                with open(p, "wb") as f:
                    f.write(b"partial")
                raise enospc(p)
        return real(path, write, tmp, durable)
    r.atomic_write = atomic_write
if fault == "enospc-merge":  # the disk fills while the merge writes
    import pyarrow.parquet as pq
    real_write = pq.ParquetWriter.write_table
    def write_table(self, table, *a, **k):
        if str(self.where).endswith((".parquet.run.tmp", "results.parquet.tmp")):
            raise enospc(self.where)
        return real_write(self, table, *a, **k)
    pq.ParquetWriter.write_table = write_table
if fault == "slow-merge":  # a merge long enough for a kill to land in it
    import amg_engine.jobs.merge as m
    m.CHUNK_ROWS, real_take = 8, m.RowReader.take
    def take(self, *a):
        time.sleep(0.05)
        return real_take(self, *a)
    m.RowReader.take = take
if os.environ.get("AMG_IDS_LOG"):  # every id the engine generates, appended once its batch returns
    import amg_engine.engine.engine as ee
    real_generate = ee.Engine.generate
    def generate(self, requests):
        out = real_generate(self, requests)
        with open(os.environ["AMG_IDS_LOG"], "a") as f:
            f.write("".join(r.id + "\n" for r in requests))
        return out
    ee.Engine.generate = generate
from amg_engine.jobs.cli import main
sys.exit(main(sys.argv[1:]))
"""

PROMPTS = [
    "An acoustic drum loop, 90 bpm", "A warm synth pad playing an A minor chord", "Rain falling on a window",
    "An electronic drum loop, 150 bpm", "A marimba arpeggio in A minor, 100 bpm", "Wind howling outside",
]  # fmt: skip


class Night:
    def __init__(self, work: Path, flags: list[str], batch: int, seed: int) -> None:
        self.work, self.out, self.manifest = work, work / "out", work / "manifest.parquet"
        self.flags, self.batch, self.rng = flags, batch, random.Random(seed)
        self.rows = 0
        self.phases: list[tuple[str, list[int | None], str]] = []

    # -- the manifest and the runs ----------------------------------------------------------------------
    def grow(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.rows += n
        k = range(self.rows)
        pq.write_table(pa.table({"id": [f"clip-{i:04d}" for i in k], "prompt": [PROMPTS[i % 6] for i in k],
                                 "seconds": [0.5 + 0.25 * (i % 3) for i in k], "seed": list(k)}),
                       self.manifest)  # fmt: skip

    def start(self, fault: str = "") -> subprocess.Popen:
        cmd = [sys.executable, "-c", CHILD, "generate", str(self.manifest), "--out", str(self.out), "--quiet",
               "--batch-size", str(self.batch), *self.flags]  # fmt: skip
        env = {**os.environ, "AMG_FAULT": fault, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "AMG_IDS_LOG": str(self.work / "generated.txt")}  # fmt: skip
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip

    def run(self, fault: str = "") -> tuple[int, str]:
        p = self.start(fault)
        _, err = p.communicate(timeout=3600)
        return p.returncode, err

    def parts(self) -> list[Path]:
        return sorted((self.out / "results").glob("part-*.parquet"))

    def _wait(self, p: subprocess.Popen, ready, timeout: float = 600) -> bool:
        deadline = time.monotonic() + timeout
        while p.poll() is None and time.monotonic() < deadline:
            if ready():
                return True
            time.sleep(0.01)
        return False

    def kill_when(self, p: subprocess.Popen, ready, delay: float) -> int:
        if self._wait(p, ready):
            time.sleep(delay)
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=600)
        return p.returncode

    # -- the phases ---------------------------------------------------------------------------------
    def kills(self, n: int) -> None:
        codes = []
        for _ in range(n):
            self.grow(3 * self.batch)
            before, want = len(self.parts()), self.rng.randint(1, 3)
            p = self.start()
            codes.append(
                self.kill_when(p, lambda n=before + want: len(self.parts()) >= n, self.rng.uniform(0, 1))
            )
        self.phases.append(("kill", codes, "-9: killed; 0: finished before the kill"))

    def merge_kills(self, n: int) -> None:
        codes, inside = [], 0
        merging = lambda: (
            any((self.out / "results").glob("*.parquet.run.tmp"))
            or (  # noqa: E731
                self.out / "results.parquet.tmp"
            ).exists()
        )
        for _ in range(n):
            self.grow(self.batch)
            p = self.start("slow-merge")
            if self._wait(p, merging):
                inside += 1
                time.sleep(self.rng.uniform(0, 0.3))
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
            p.communicate(timeout=600)
            codes.append(p.returncode)
        self.phases.append(("kill-merge", codes, f"{inside} of {n} kills waited for a merge file"))

    def full_disk(self) -> None:
        self.grow(2 * self.batch)
        audio = self.run(f"enospc-audio:{self.rng.randint(1, 2 * self.batch - 1)}")
        self.grow(self.batch)
        merge = self.run("enospc-merge")
        said = [_said(e) for _, e in (audio, merge)]
        one_line = all(len(s) == 1 and "ENOSPC" in s[0] for s in said) and not any(
            "Traceback" in e for _, e in (audio, merge)
        )
        note = f"one line each, no traceback: {one_line}; {said[0][0][:90] if said[0] else ''}…"
        self.phases.append(("full-disk", [audio[0], merge[0]], note))

    def second_run(self) -> None:
        self.grow(2 * self.batch)
        a, b = self.start(), self.start()
        errs = [p.communicate(timeout=3600)[1] for p in (a, b)]
        codes = [a.returncode, b.returncode]
        busy = next((ln for e in errs for ln in _said(e) if "another run" in ln), "")
        self.phases.append(("second-run", codes, busy[:110] + "…" if busy else "both ran (one ended first)"))

    def truncate(self) -> None:
        self.grow(3 * self.batch)
        p = self.start()
        before = len(self.parts())
        code = self.kill_when(p, lambda: len(self.parts()) >= before + 1, 0.0)
        newest = self.parts()[-1]
        _cut(newest)
        first = self.run()
        _cut(self.parts()[-1])  # the compacted shard: every row's record
        second = self.run()
        self.phases.append(
            ("truncate", [code, first[0], second[0]], f"{newest.name} cut, then the compacted one")
        )

    # -- the verdict --------------------------------------------------------------------------------
    def verdict(self) -> dict:
        import pyarrow.parquet as pq
        import soundfile as sf

        res = pq.read_table(self.out / "results.parquet").to_pylist()
        want = [f"clip-{i:04d}" for i in range(self.rows)]
        by_id = {r["id"]: r for r in res}
        lost = [i for i in want if not _proven(self.out, by_id.get(i), sf)]
        audio = {p.name for p in (self.out / "audio").iterdir()}
        stray = audio - {
            Path(by_id[i]["audio_path"]).name for i in want if i in by_id and by_id[i]["audio_path"]
        }
        made = Counter((self.work / "generated.txt").read_text().split())
        return dict(rows=self.rows, results=len(res), in_order=[r["id"] for r in res] == want, lost=len(lost),
                    lost_ids=lost[:5], stray_audio=sorted(stray)[:5],
                    tmp_files=[str(p) for p in self.out.rglob("*.tmp")],
                    corrupt_set_aside=len(list((self.out / "results").glob("*.corrupt"))),
                    row_generations=sum(made.values()), redone=sum(made.values()) - len(made),
                    ids_redone=sum(c > 1 for c in made.values()))  # fmt: skip


def _said(stderr: str) -> list[str]:
    """The CLI's own lines (``amg: ...``), without the libraries' warnings."""
    return [ln for ln in stderr.splitlines() if ln.startswith("amg:")]


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _proven(out: Path, r: dict | None, sf) -> bool:
    """An ok row whose audio decodes, has the row's length and the recorded digest."""
    if r is None or r["status"] != "ok" or not r["audio_path"]:
        return False
    path = out / r["audio_path"]
    try:
        data = path.read_bytes()
        info = sf.info(path)
    except Exception:
        return False
    return hashlib.sha256(data).hexdigest() == r["audio_sha256"] and info.frames == round(
        r["seconds"] * info.samplerate
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rows", type=int, default=48, help="rows before the phases (each phase adds a few batches)"
    )
    ap.add_argument("--kills", type=int, default=4, help="random SIGKILLs over runs")
    ap.add_argument("--merge-kills", type=int, default=3, help="SIGKILLs inside the final merge")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="working folder (default: a fresh temporary one)")
    ap.add_argument("flags", nargs="*", help="engine flags for amg generate (default: --no-amg --steps 4)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="amg-faults-"))
    night = Night(work, args.flags or ["--no-amg", "--steps", "4"], args.batch_size, args.seed)
    start = time.perf_counter()
    night.grow(args.rows)
    night.kills(args.kills)
    night.merge_kills(args.merge_kills)
    night.full_disk()
    night.second_run()
    night.truncate()
    final, err = night.run()
    night.phases.append(("rerun", [final], " ".join(_said(err))[:110] or "no message"))
    v = night.verdict()
    print(f"folder: {night.out}  ({time.perf_counter() - start:.0f} s)")
    print(f"{'phase':<11} | {'exit codes':<18} | note")
    for name, codes, note in night.phases:
        print(f"{name:<11} | {' '.join(map(str, codes)):<18} | {note}")
    print(f"rows {v['rows']}, result rows {v['results']} (in manifest order: {v['in_order']}), "
          f"engine row-generations {v['row_generations']} ({v['redone']} repeated, of {v['ids_redone']} ids: "
          "rows in flight at a kill or a fault, rows of the shard cut before its merge), "
          f"shards set aside {v['corrupt_set_aside']}")  # fmt: skip
    print(f"lost: {v['lost']} {v['lost_ids'] or ''}; stray audio files: {len(v['stray_audio'])}; "
          f"temporary files left: {len(v['tmp_files'])}")  # fmt: skip
    bad = v["lost"] or v["stray_audio"] or v["tmp_files"] or not v["in_order"] or final != 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
