"""Shared by the observability tests: a tiny CPU run through the real CLI, and file readers."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO, tiny_overrides


def tracker_env(root: Path) -> dict[str, str]:
    """Every tracker offline and writing under `root` (nothing in $HOME, nothing on the network)."""
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data"),
        "TRACKIO_DIR": str(root / "trackio"), "MLFLOW_ALLOW_FILE_STORE": "true",
    })
    env.pop("WANDB_API_KEY", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.cli.main", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def tiny_run_args(tok: Path, out: Path, train: Path, valid: Path, **extra: Any) -> list[str]:
    """`train` arguments for the tiny Llama with a small eval (2 batches)."""
    base = {"data.validation_path": valid, "eval.max_batches": 2, "logging.steps": 1,
            "schedule.warmup_steps": 1}
    return ["train", *tiny_overrides(tok, out, train, **{**base, **extra})]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wandb_records(run_file: Path) -> list[Any]:
    """Decode an offline W&B run file (run-<id>.wandb) into wandb's own protobuf `Record`s.

    The file is a 7-byte header (":W&B", magic, version) then a LevelDB-style log: 32 KiB
    blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    block, pos, out, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
    recs = []
    for raw in out:
        rec = pb.Record()
        rec.ParseFromString(raw)
        recs.append(rec)
    return recs
