"""parallel/launch.py and cli/dist.py on CPU: the launcher refuses a bad layout before torchrun
starts, builds torchrun's arguments, and workers keep normal exit codes without NCCL."""

from __future__ import annotations

import argparse
import time

import pytest

from tunesmith.cli.dist import run_worker
from tunesmith.cli.main import run
from tunesmith.errors import TunesmithError
from tunesmith.parallel.launch import add_launch_args, torchrun_argv


def test_launch_rejects_bad_layout_before_starting_workers(monkeypatch, capsys):
    import torch.distributed.run as trun

    monkeypatch.setattr(trun, "run", lambda *a, **k: pytest.fail("torchrun must not start"))
    start = time.monotonic()
    code = run(["launch", "--nproc-per-node", "3", "data.path=x", "parallel.tp=2"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 10
    assert err.strip() == "tunesmith: error: parallel.tp=2 does not divide the world size 3"


def test_launch_builds_torchrun_arguments():
    p = argparse.ArgumentParser()
    add_launch_args(p)
    one = torchrun_argv(p.parse_args(["--nproc-per-node", "8", "r.yaml"]), "tunesmith", ["train", "r.yaml"])
    assert "--standalone" in one and one[-4:] == ["-m", "tunesmith", "train", "r.yaml"]
    multi = torchrun_argv(p.parse_args(["--nnodes", "4", "--nproc-per-node", "8", "--rdzv-endpoint",
                                        "node0:29500", "--rdzv-id", "42", "r.yaml"]), "tunesmith", ["train"])
    joined = " ".join(multi)
    assert "--standalone" not in multi and "--nnodes 4" in joined
    assert "--rdzv-endpoint node0:29500" in joined and "--rdzv-id 42" in joined
    with pytest.raises(TunesmithError, match="needs --rdzv-endpoint"):
        torchrun_argv(p.parse_args(["--nnodes", "2", "--nproc-per-node", "8"]), "tunesmith", ["train"])


def test_worker_failures_without_nccl_keep_normal_exit():
    """`run_worker` returns codes and re-raises bugs as usual when no NCCL group is up (the
    os._exit path is for NCCL only; its end-to-end check is test_failures on CUDA)."""
    assert run_worker(lambda: 2) == 2

    def bug() -> int:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_worker(bug)

