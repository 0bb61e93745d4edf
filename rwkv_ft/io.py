"""Reading and writing files safely, for every part of rwkv_ft (no RWKV version knowledge here).

- `write_atomically`: build a file or directory in a temporary sibling, then rename it into place,
  so a crash never leaves a half-written result; the result gets the user's umask (temporary files
  are created private by the OS).
- `read_safetensors`, `read_pth`, `read_json_object`: readers whose errors name the file and say
  what is wrong (truncated, not a checkpoint, refused pickle) instead of a library traceback.
- `resolve_model_source`: a local path or a Hugging Face Hub id, checked before any slow work.
- `DTYPES`: the dtype names recipes and the command line accept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be used, with what is wrong and where."""


# --------------------------------------------------------------------------------------------------
# Permissions and atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (and, for a directory, everything in it) the permissions a plain `open`/`mkdir`
    would: mkdtemp and mkstemp create 0700 / 0600 entries, which would hide results from the group."""
    mask = _umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    if path.is_dir():
        os.chmod(path, dir_mode)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), dir_mode)
            for name in files:
                os.chmod(os.path.join(root, name), file_mode)
    elif path.exists():
        os.chmod(path, file_mode)


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty `out` unless `overwrite` (called before any slow work)."""
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_atomically(
    out: str | os.PathLike, write: Callable[[Path], Any], *, overwrite: bool = False, is_dir: bool = True
) -> Path:
    """Call `write(tmp_path)` on a temporary sibling of `out`, then move it into place.

    The old `out` (when `overwrite`) is moved aside first and deleted only after the new one is in
    place, so at every moment either the old or the new complete result exists under its name.
    """
    out = Path(out)
    prepare_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        write(tmp)
        apply_umask(tmp)
        old = None
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise
    return out


def write_json_atomically(path: str | os.PathLike, value: Any) -> Path:
    """`value` as indented JSON at `path`, written atomically."""
    text = json.dumps(value, indent=2, default=str) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text), overwrite=True, is_dir=False)


# --------------------------------------------------------------------------------------------------
# Readers with located errors


def require_path(path: str | os.PathLike, what: str = "file or directory") -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such {what}: {path}")
    return path


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object stored at `path`, None if there is no such file; an error naming the file otherwise."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); fix or delete it") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a JSON {type(value).__name__}")
    return value


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file; a truncated or foreign file is named, not a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = require_path(path, "safetensors file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); the file is probably truncated "
            "(an interrupted download or copy): fetch or write it again"
        ) from exc


def check_safetensors_header(path: Path) -> None:
    """Raise CheckpointError when `path` is not a complete safetensors file (header and size)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if keys:
                f.get_slice(keys[-1])  # parsing the header checks every offset against the file size
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); it is probably truncated") from exc


def _is_zip_checkpoint(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


def read_pth(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.pth`/`.bin` file, loaded with `weights_only=True` (no code can run).

    Zip-format files (torch >= 1.6) are memory-mapped; legacy (pre-zip) files, which early RWKV-4
    checkpoints are, are read whole (torch cannot mmap them).
    """
    path = require_path(path, "checkpoint file")
    mmap = _is_zip_checkpoint(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        if type(exc).__name__ == "UnpicklingError" or "weights_only" in str(exc):
            raise CheckpointError(
                f"{path}: refused to load: the file holds Python objects other than tensors, and loading "
                "them could run arbitrary code (torch.load(weights_only=True) rejected "
                f"{_first_line(exc)!r}). Only load checkpoints you trust; convert a trusted one to "
                "safetensors first"
            ) from exc
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
            "the file may be truncated or not a checkpoint"
        ) from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors (a state dict), got {type(obj).__name__}")
    return dict(obj)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Where a model comes from

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".json", ".yaml", ".yml", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    """A model location: a local path, or a Hub repo fetched into the local cache."""

    path: Path
    hub_id: str | None = None

    @property
    def record(self) -> str:
        """What to write down as the model's origin: the Hub id, or the absolute local path."""
        return self.hub_id or str(self.path.resolve())


HUB_TIMEOUT_ENV = "RWKV_FT_HUB_TIMEOUT"


def ensure_network_timeouts() -> float:
    """Give huggingface_hub's shared HTTP client connect/read timeouts where it has none (its 2.x
    default waits forever on a server that accepts the connection and never answers). Called before
    every Hub request we make (models, tokenizers, datasets, uploads). The read timeout is
    `RWKV_FT_HUB_TIMEOUT` seconds (default 60); a timeout the user configured is kept."""
    from huggingface_hub import get_session

    seconds = float(os.environ.get(HUB_TIMEOUT_ENV, "60"))
    session = get_session()
    timeout = session.timeout
    if timeout.read is None or timeout.connect is None:
        session.timeout = type(timeout)(seconds, connect=min(seconds, 10.0), write=max(seconds, 300.0))
    return float(session.timeout.read)


def network_failure(exc: BaseException) -> str:
    """`exc` in a few words, saying how long we waited when a timeout caused it (huggingface_hub
    wraps those in its own errors)."""
    text = f"{type(exc).__name__}: {_first_line(exc)}"
    causes, cause = [], exc
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any("Timeout" in type(c).__name__ for c in causes):
        from huggingface_hub import get_session

        text += f"; no answer within {get_session().timeout.read:g} s, set {HUB_TIMEOUT_ENV} to wait longer"
    return text


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.endswith(_FILE_SUFFIXES)


def hub_is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_source(spec: str | os.PathLike, *, what: str = "model") -> ModelSource:
    """A local path that exists, or a Hub repo id made local (downloaded or taken from the cache).

    Called before any slow work, so that a typo fails in a second with a message naming the path.
    A Hub id is fetched once (no retries: a failed request means no network, and the error says
    so); with HF_HUB_OFFLINE=1 only the local cache is looked at.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        return ModelSource(path)
    if not looks_like_hub_id(text):
        raise FileNotFoundError(f"{what} {text!r}: no such file or directory")
    try:
        local = _download_model(text)
    except Exception as exc:  # missing repo, no network, offline without a cached copy
        where = "in the local Hub cache (HF_HUB_OFFLINE=1)" if hub_is_offline() else "on the Hugging Face Hub"
        raise FileNotFoundError(
            f"{what} {text!r}: no such local file or directory, and no model {text!r} {where} "
            f"({network_failure(exc)}). Check the path, or download the model first"
        ) from exc
    return ModelSource(local, hub_id=text)


def _download_model(repo_id: str) -> Path:
    """The local snapshot of Hub model `repo_id`: downloaded, or from the cache."""
    from huggingface_hub import snapshot_download

    return fetch_from_hub(repo_id, lambda **kwargs: snapshot_download(repo_id, etag_timeout=10, **kwargs))


def fetch_from_hub(repo_id: str, download: Callable[..., str]) -> Path:
    """`download(local_files_only=..., revision=...)` for Hub model repo `repo_id`, never waiting
    on a network that is not there: with HF_HUB_OFFLINE=1 the cache only; otherwise one metadata
    request first, with a timeout and no retries. huggingface_hub's download functions retry a
    failing request for ~30 s (printing each retry) and, on recent releases, make metadata requests
    with no timeout at all (forever, on a Hub that accepts the connection and never answers). When
    that request fails, a cached copy still serves; else its error is raised."""
    from huggingface_hub import HfApi

    if hub_is_offline():
        return Path(download(local_files_only=True, revision=None))
    try:
        revision = HfApi().model_info(repo_id, timeout=ensure_network_timeouts()).sha
    except Exception as exc:
        try:
            return Path(download(local_files_only=True, revision=None))
        except Exception:
            raise exc from None
    return Path(download(local_files_only=False, revision=revision))
