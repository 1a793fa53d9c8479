"""Layout validation across real worker processes: every rank of a plain torchrun job refuses a
bad layout before init_process_group. The CPU-only checks (degrees, the launcher's arguments,
DeepSpeed import) are in tests/unit/parallel/ and tests/unit/config/."""

from __future__ import annotations

from tests.distributed.helpers import job, torchrun


def test_workers_exit_2_before_process_group(tiny_tokenizer_dir, demo_text, tmp_path):
    """Plain torchrun: every rank rejects the layout before init_process_group; rank 0 speaks."""
    train, valid = demo_text
    argv = ["-m", "tunesmith", "train", *job(tiny_tokenizer_dir, train, valid, tmp_path / "r",
                                             extra=("parallel.tp=4",))]
    proc = torchrun(2, argv, timeout=120)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("tunesmith: error")]
    assert lines == ["tunesmith: error (rank 0): parallel.tp=4 does not divide the world size 2"], proc.stderr[-2000:]
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing written
