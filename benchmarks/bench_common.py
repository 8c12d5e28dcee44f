"""What every benchmark records beside its figures: the machine, versions, git SHA and command."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_dirty() -> bool | None:
    """Whether tracked files other than the benchmark logs had uncommitted changes (the SHA alone is
    then not the code)."""
    try:
        out = subprocess.run(
            # the JSON-lines logs themselves are left out: appending a record is not a code change
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)*.jsonl"],
            cwd=ROOT, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def environment(device: str) -> dict:
    """machine (host, cpu, cores, gpu, python), torch version, git SHA (and whether the tree was dirty),
    and the command line."""
    return dict(
        machine=dict(
            host=platform.node(), cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
            gpu=torch.cuda.get_device_name() if device == "cuda" else None, python=platform.python_version(),
        ),
        torch=torch.__version__, git_sha=git_sha(), git_dirty=git_dirty(),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
    )  # fmt: skip


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line to ``path``."""
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")
