"""hf/io: the shard plan, sharded safetensors with an index, atomic output directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.errors import TunesmithError
from tunesmith.hf import io as hfio


def test_plan_shards_is_greedy_and_in_order():
    sizes = [("a", 4), ("b", 4), ("c", 9), ("d", 1)]
    assert hfio.plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d"]]
    assert hfio.plan_shards(sizes, 100) == [["a", "b", "c", "d"]]


def test_sharded_save_writes_an_index_that_names_every_tensor(tmp_path):
    tensors = {f"w{i}": torch.full((4, 4), float(i)) for i in range(3)}
    files = hfio.save_safetensors_sharded(tmp_path, list(tensors), tensors.__getitem__,
                                          lambda n: tensors[n].nbytes, max_shard_bytes=64)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 3 * 64
    for name, fname in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / fname))[name], tensors[name])
    assert hfio.find_weight_files(tmp_path) == [tmp_path / f for f in files]


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with hfio.atomic_output_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("crash mid-save")
    assert list(tmp_path.iterdir()) == []
    with hfio.atomic_output_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").is_file() and len(list(tmp_path.iterdir())) == 1


def test_atomic_output_dir_refuses_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TunesmithError, match="refusing to overwrite"):
        with hfio.atomic_output_dir(tmp_path):
            pass
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_hub_ids_are_told_apart_from_paths():
    assert hfio.looks_like_hub_id("meta-llama/Llama-3.2-1B")
    assert not hfio.looks_like_hub_id("./out/final") and not hfio.looks_like_hub_id("/abs/path")


def test_atomic_output_dir_under_a_file_is_one_clear_error(tmp_path):
    """`tunesmith export/merge --out FILE/x` was a FileExistsError traceback."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "x"
    with pytest.raises(TunesmithError, match=rf"cannot write {out} \(File exists: .*afile\)"):
        with hfio.atomic_output_dir(out):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
