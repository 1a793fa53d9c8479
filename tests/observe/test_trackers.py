"""Every tracker for real, offline: a tiny run that is stopped and resumed, read back with each
tracker's own reader (TensorBoard's EventAccumulator, MlflowClient on the file store, W&B's
protobuf records from the offline run file, trackio's SQLite storage)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.observe.helpers import records, run_cli, tiny_run_args, tracker_env, wandb_records
from tunesmith.checkpoint import CheckpointManager

pytest.importorskip("tensorboard", reason="needs tunesmith[tensorboard]")
pytest.importorskip("mlflow", reason="needs tunesmith[mlflow]")
pytest.importorskip("wandb", reason="needs tunesmith[wandb]")
pytest.importorskip("trackio", reason="needs tunesmith[trackio]")

TRACKERS = "[tensorboard,mlflow,wandb,trackio]"


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_tokenizer_dir, demo_text):
    """Steps 1-3 (checkpoint at 3), then resumed to step 6: two processes, one tracker run each."""
    root = tmp_path_factory.mktemp("trackers")
    train, valid = demo_text
    out = root / "run"
    env = tracker_env(root)
    common = {"logging.trackers": TRACKERS, "logging.project": "tstest", "logging.run_name": "tiny",
              "logging.tags": "[ci,tiny]", "logging.log_model": "true", "checkpoint.every_steps": 3,
              "eval.every_steps": 3}
    first = run_cli(tiny_run_args(tiny_tokenizer_dir, out, train, valid, **{"train.max_steps": 3}, **common),
                    env, root)
    assert first.returncode == 0, first.stderr[-3000:]
    ids_first = CheckpointManager.read_manifest(out / "checkpoints" / "step_00000003")["meta"]["trackers"]
    second = run_cli(tiny_run_args(tiny_tokenizer_dir, out, train, valid, **{"train.max_steps": 6},
                                   **common, **{"checkpoint.resume": "auto"}), env, root)
    assert second.returncode == 0, second.stderr[-3000:]
    return root, out, env, ids_first


def test_checkpoint_keeps_tracker_run_ids(resumed_run):
    _, out, _, ids_first = resumed_run
    assert set(ids_first) == {"tensorboard", "mlflow", "wandb", "trackio"}
    ids_second = CheckpointManager.read_manifest(out / "checkpoints" / "step_00000006")["meta"]["trackers"]
    assert ids_second == ids_first  # the resumed process continued the same runs
    events = [e["event"] for e in records(out / "events.jsonl")]
    assert events == ["start", "checkpoint", "end", "resume", "checkpoint", "end"]


def test_tensorboard_event_files(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _, _ = resumed_run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("eval/loss")] == [3, 6]
    want = [r["loss"] for r in records(out / "metrics.jsonl") if "loss" in r]
    assert [round(e.value, 5) for e in acc.Scalars("train/loss")] == pytest.approx(want, abs=1e-5)
    assert "train/tokens_seen" in tags["scalars"] and "eval/perplexity" in tags["scalars"]
    assert "config/text_summary" in tags["tensors"] and "summary/text_summary" in tags["tensors"]
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "optim.lr: 0.003" in config_text
    assert "hparams" in acc.PluginTagToContent("hparams") or acc.PluginTagToContent("hparams")


def test_mlflow_file_store(resumed_run, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this
    _, out, _, ids = resumed_run
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("tstest")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]  # one run across the resume
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["train.max_steps"] == "3"
    assert set(run.data.tags) >= {"ci", "tiny"}
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5, 6]
    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["summary/steps"] == 6
    assert run.data.metrics["summary/eval_loss"] == pytest.approx(summary["eval_loss"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "final")}
    assert "final/config.json" in artifacts and "final/model.safetensors" in artifacts


def test_wandb_offline_run(resumed_run):
    _, out, _, ids = resumed_run
    run_dirs = sorted((out / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(run_dirs) == 2  # one per process, the same run id: `wandb sync` joins them
    steps, summary, config = [], {}, {}
    for d in run_dirs:
        for rec in wandb_records(d / f"run-{ids['wandb']}.wandb"):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                if "train/loss" in items:
                    steps.append(items["_step"])
            elif kind == "run":
                config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
                assert rec.run.display_name == "tiny" and list(rec.run.tags) == ["ci", "tiny"]
            elif kind == "summary":
                summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                                for u in rec.summary.update})
            elif kind == "artifact":
                assert rec.artifact.type == "model"
    assert steps == [1, 2, 3, 4, 5, 6]
    assert config["optim"]["lr"] == 0.003
    assert summary["steps"] == 6 and summary["interrupted"] is False


def test_trackio_local_storage(resumed_run):
    root, out, env, ids = resumed_run
    code = ("import json; from trackio import SQLiteStorage as S; "
            "print(json.dumps([S.get_logs('tstest', 'tiny'), S.get_run_config('tstest', 'tiny')]))")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    logs, config = json.loads(res.stdout.strip().splitlines()[-1])
    assert ids["trackio"] == "tiny"
    assert [r["step"] for r in logs if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any("summary/steps" in r for r in logs)
    assert config["optim"]["lr"] == 0.003


def test_missing_tracker_library_is_one_line_exit_2(tmp_path, tiny_tokenizer_dir, demo_text):
    """The library is made unimportable in the child (sys.modules entry None), as if not installed."""
    train, valid = demo_text
    env = tracker_env(tmp_path)
    args = tiny_run_args(tiny_tokenizer_dir, tmp_path / "run", train, valid,
                         **{"train.max_steps": 2, "logging.trackers": "[tensorboard,wandb]"})
    code = ("import sys; sys.modules['wandb'] = None; from tunesmith.cli.main import main; "
            f"main({args!r})")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tunesmith[wandb]'" in lines[0], res.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_credentials_in_config_are_refused(tmp_path, tiny_tokenizer_dir, demo_text):
    from tunesmith.cli.main import run

    train, valid = demo_text
    args = tiny_run_args(tiny_tokenizer_dir, tmp_path / "run", train, valid,
                         **{"logging.tracker_options": "{wandb: {api_key: abc}}"})
    assert run(args) == 2
    assert not (tmp_path / "run").exists()
