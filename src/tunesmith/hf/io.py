"""HF-format file IO: config JSON, safetensors/pickle weight iteration, sharded writing, hub access.

Nothing here knows about model architectures; `tunesmith.models` maps names and shapes.
Memory rule: tensors are produced one at a time (safetensors are memory-mapped), and sharded
saves materialise at most one shard on the host at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import TunesmithError, first_line
from tunesmith.hf.files import os_error_reason

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_PATTERNS = [
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.*",
]
# Only `org/name` ids are tried on the hub: bare names are almost always preset typos, and an
# offline hub lookup costs ~20 s of retries before failing.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------- JSON
def read_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise TunesmithError(f"file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TunesmithError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise TunesmithError(f"{p}: not UTF-8 text (byte {e.start}): damaged or not a JSON file"
                             ) from None
    if not isinstance(data, dict):
        raise TunesmithError(f"{p}: expected a JSON object at the top level")
    return data


# Types of the config.json fields the model families read. A wrong type here (an edited or
# damaged file) would otherwise surface as `int('big')` deep inside a config class.
_INT_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim", "n_embd",
    "n_layer", "n_head", "n_positions", "n_ctx", "n_inner", "type_vocab_size", "rotary_dim",
    "sliding_window",
)
_NULLABLE_INT_FIELDS = ("head_dim", "n_inner", "sliding_window", "rotary_dim",
                        "num_key_value_heads", "intermediate_size")
_FLOAT_FIELDS = (
    "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "rotary_pct",
    "rotary_emb_base", "initializer_range", "attention_dropout", "hidden_dropout_prob",
)
_BOOL_FIELDS = ("tie_word_embeddings", "use_parallel_residual", "attention_bias", "mlp_bias")
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config_types(path: str | Path, data: dict[str, Any]) -> None:
    """Raise one line naming `path` and the first field whose JSON type cannot be right."""
    def bad(key: str, want: str) -> TunesmithError:
        return TunesmithError(f"{path}: field {key!r} must be {want}, got {data[key]!r}")

    for key in _INT_FIELDS:
        if key in data and not _is_int(data[key]) and (data[key] is not None
                                                       or key not in _NULLABLE_INT_FIELDS):
            raise bad(key, "an integer")
    for key in _FLOAT_FIELDS:
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(key, "a number")
    for key in _BOOL_FIELDS:
        if key in data and not isinstance(data[key], bool):
            raise bad(key, "true or false")
    for key in _TOKEN_ID_FIELDS:
        v = data.get(key)
        ok = v is None or _is_int(v) or (isinstance(v, list) and all(_is_int(i) for i in v))
        if not ok:
            raise bad(key, "a token id, a list of ids or null")
    if "model_type" in data and not isinstance(data["model_type"], str):
        raise bad("model_type", "a string")


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- hub
def looks_like_hub_id(source: str) -> bool:
    """`org/name` shaped (the form every current model repo id has)."""
    return bool(_HUB_ID_RE.match(source)) and ".." not in source


def download_hub_file(repo_id: str, filename: str) -> Path:
    """Fetch one file of a hub model repo (cached). Raises TunesmithError when unreachable."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # network, auth, missing repo: all user-facing
        raise TunesmithError(f"cannot fetch {filename} of hub repo {repo_id!r}: {first_line(e)}") from None


def snapshot_model_repo(repo_id: str) -> Path:
    """Download config, tokenizer and weights of a hub model; return the local snapshot dir.

    safetensors are preferred; pickle `.bin` weights are fetched only when a repo has none.
    """
    from huggingface_hub import snapshot_download

    patterns = CONFIG_FILES + TOKENIZER_PATTERNS + ["*.safetensors", SAFE_INDEX]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not any(local.glob("*.safetensors")):
            bin_patterns = ["pytorch_model*.bin", BIN_INDEX]
            local = Path(snapshot_download(repo_id, allow_patterns=bin_patterns))
    except Exception as e:
        raise TunesmithError(f"cannot download hub repo {repo_id!r}: {first_line(e)}") from None
    return local


# ---------------------------------------------------------------------------- reading
def find_weight_files(model_dir: str | Path) -> list[Path]:
    """Weight files of a HF model dir, safetensors first, sharded or not."""
    d = Path(model_dir)
    for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        if (d / index_name).is_file():
            weight_map = read_json(d / index_name).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (d / f).is_file()]
            if missing:
                raise TunesmithError(f"{d / index_name}: listed shard missing: {d / missing[0]}")
            return [d / f for f in files]
        if (d / single).is_file():
            return [d / single]
    raise TunesmithError(
        f"no weights in {d}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
    )


def _load_pickle(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    # weights_only: never execute code from a checkpoint unless the user opted in
    # (model.allow_unsafe_pickle). mmap avoids reading everything up front but only works
    # for the zip format (torch >= 1.6), so fall back without it.
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not allow_pickle:
            # torch's refusal is a multi-line how-to with ANSI bold; the reason is one line in it.
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            reason = f"it references {found.group(1)}" if found else first_line(e)
            raise TunesmithError(
                f"cannot read {path} safely (weights_only): {reason}; convert it to safetensors, "
                "or set model.allow_unsafe_pickle=true if you trust its source"
            ) from None
        try:
            sd = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001 -- any failure of a foreign pickle is the file's
            raise TunesmithError(f"cannot unpickle {path}: {first_line(e2)}") from None
    if not isinstance(sd, dict):
        raise TunesmithError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


@contextlib.contextmanager
def open_safetensors(path: Path, device: str | None = None) -> Iterator[Any]:
    """`safe_open` whose failures (0-byte, truncated, garbage header) are one line naming the file."""
    from safetensors import SafetensorError, safe_open

    kwargs = {"device": device} if device else {}
    try:
        handle = safe_open(str(path), framework="pt", **kwargs)
    except (SafetensorError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        size = path.stat().st_size if path.exists() else 0
        raise TunesmithError(
            f"{path}: not a readable safetensors file ({reason}; {size} bytes): the file is "
            "damaged or incomplete, e.g. an interrupted download; fetch or save it again"
        ) from None
    with handle as st:
        yield st


def tensor_shapes(
    files: Sequence[Path], allow_pickle: bool = False
) -> dict[str, tuple[tuple[int, ...], Path]]:
    """name -> (shape, file) without loading data (headers only for safetensors)."""
    out: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with open_safetensors(f) as st:
                for name in st.keys():
                    out[name] = (tuple(st.get_slice(name).get_shape()), f)
        else:
            for name, t in _load_pickle(f, allow_pickle).items():
                out[name] = (tuple(t.shape), f)
    return out


def iter_tensors(
    files: Sequence[Path], allow_pickle: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, cpu tensor) one at a time, one file after the other."""
    for f in files:
        if f.suffix == ".safetensors":
            with open_safetensors(f, device="cpu") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        else:
            sd = _load_pickle(f, allow_pickle)
            for name in list(sd):
                yield name, sd.pop(name)
            del sd


# ---------------------------------------------------------------------------- writing
def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy in-order grouping; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def save_safetensors_sharded(
    out_dir: Path,
    names: Sequence[str],
    get_tensor: Callable[[str], torch.Tensor],
    nbytes: Callable[[str], int],
    max_shard_bytes: int,
) -> list[str]:
    """Write `model.safetensors` or `model-0000i-of-0000n.safetensors` + index; return files.

    `get_tensor(name)` must return a contiguous cpu tensor; it is called shard by shard so at
    most one shard is resident on the host.
    """
    from safetensors.torch import save_file

    shards = plan_shards([(n, nbytes(n)) for n in names], max_shard_bytes)
    n_shards = len(shards)
    weight_map: dict[str, str] = {}
    files: list[str] = []
    for i, shard in enumerate(shards):
        fname = SAFE_SINGLE if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {n: get_tensor(n) for n in shard}
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})  # HF requires format
        del tensors
        weight_map.update({n: fname for n in shard})
        files.append(fname)
    if n_shards > 1:
        total = sum(nbytes(n) for n in names)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(out_dir / SAFE_INDEX, index)
    return files


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp dir next to `out_dir`; on success it replaces `out_dir` by rename.

    A crash leaves only a hidden `.<name>.tmp-*` dir, never a half-written model. An existing
    `out_dir` is replaced only when it is empty or looks like a saved model (has config.json)
    or adapter (has adapter_config.json).
    """
    final = Path(out_dir).resolve()
    saved = (final / "config.json").exists() or (final / "adapter_config.json").exists()
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not saved)):
        raise TunesmithError(f"refusing to overwrite {final}: it exists and is not a saved model")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:  # a parent that is a file, a read-only or full disk
        raise TunesmithError(f"cannot write {final} ({os_error_reason(e)})") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a saved model should be readable like any dir
    try:
        yield tmp
        old: Path | None = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
