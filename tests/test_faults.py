"""Faults and hostile input: interrupted writes, poisoned runs, finished runs, concurrent runs,
configs that disagree with their weights, old and malicious checkpoints, a Hub that never answers.
The training cases run `rwkv-ft train` as a subprocess, the way a user (or a crash) meets them."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rwkv_ft.cli import main
from rwkv_ft.testing import randomize_, tiny_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
TINY = [
    "model.config={vocab_size: 65536, hidden_size: 32, num_hidden_layers: 2}",
    "data.max_length=64",
    "training.batch_size=4",
    "training.logging_steps=1",
    "training.warmup_steps=0",
    "training.schedule=constant",
    "training.lr=0.01",
    "adapter.dropout=0.0",
    "merge.enabled=false",
    "generate.prompt=null",
]


def train(out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`rwkv-ft train` on the quickstart recipe in a fresh process."""
    command = [sys.executable, "-m", "rwkv_ft.cli", "train", QUICKSTART, *TINY, f"training.output_dir={out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # No library warning a user can do nothing about (deprecations of APIs we call, probes, ...).
    assert not re.search(r"[a-z]Warning: ", proc.stderr), proc.stderr[-3000:]
    return proc


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


# ------------------------------------------------------------------------------------------------
# Durability (subprocesses)


def test_a_base_left_half_written_by_a_kill_is_rebuilt(tmp_path):
    out = tmp_path / "run"
    (out / "base").mkdir(parents=True)
    (out / "base" / "config.json").write_text("")  # what a kill during save_pretrained leaves
    proc = train(out, "training.max_steps=2", "merge.enabled=true")  # merged too: no warnings on that path
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "merged" / "model.safetensors").exists()
    assert json.loads((out / "base" / "config.json").read_text())["model_type"] == "rwkv4"
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_a_poisoned_run_never_saves_bad_weights_and_resume_recovers(tmp_path):
    out = tmp_path / "run"
    proc = train(out, "training.max_steps=3", "training.save_steps=1", "training.lr=1e30")
    assert proc.returncode == 2
    assert "not finite" in proc.stderr and "step 2" in proc.stderr
    assert "no good checkpoint" in proc.stderr and "--resume" in proc.stderr
    assert checkpoints(out) == [] and (out / "rejected-checkpoints" / "checkpoint-1").exists()
    proc = train(out, "training.max_steps=3", "training.save_steps=1", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e3 for t in adapter(out).values())


def test_resume_on_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert train(out, "training.max_steps=2", "training.save_steps=1").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".rwkv_ft.lock"}
    proc = train(out, "training.max_steps=2", "training.save_steps=1", "--resume")
    assert proc.returncode == 0 and "run is complete" in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".rwkv_ft.lock"}
    assert after == before
    # Raising the target continues from the last step instead.
    proc = train(out, "training.max_steps=3", "training.save_steps=1", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["resumed_from_step"] == 2


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from rwkv_ft.train import OutputLock; from pathlib import Path; import time\n"
         f"with OutputLock(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"]):
            proc = train(out, "training.max_steps=1", *extra)
            assert proc.returncode == 2 and f"pid {holder.pid}" in proc.stderr and "in use" in proc.stderr
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    # The holder died without cleaning up: its lock file stays, and does not block the next run.
    assert (out / ".rwkv_ft.lock").exists()
    assert train(out, "training.max_steps=1").returncode == 0


def test_adapter_initialisation_does_not_depend_on_a_skipped_base_build(tmp_path):
    """A restart after a pre-checkpoint kill finds base/ already written (so skips building it):
    it must still train from the same initial adapter."""
    import shutil

    assert train(tmp_path / "a", "training.max_steps=2").returncode == 0
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "base", tmp_path / "b" / "base")
    assert train(tmp_path / "b", "training.max_steps=2").returncode == 0
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# Configs and checkpoints (in process)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, err


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    from rwkv_ft import Rwkv4ForCausalLM

    path = tmp_path / "model"
    randomize_(Rwkv4ForCausalLM(tiny_config()), seed=4).save_pretrained(path)
    return path


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_a_config_that_disagrees_with_the_weights_is_named(model_dir, tmp_path, capsys):
    edit_config(model_dir, num_hidden_layers=3)
    from peft import LoraConfig, get_peft_model

    from rwkv_ft import Rwkv4ForCausalLM

    get_peft_model(Rwkv4ForCausalLM(tiny_config()), LoraConfig(r=2)).save_pretrained(tmp_path / "lora")
    for argv in (
        ("generate", str(model_dir), "--prompt", "hi"),
        ("merge", str(model_dir), str(tmp_path / "lora"), str(tmp_path / "merged")),
        ("export", str(model_dir), str(tmp_path / "x.pth"), "--format", "pth"),
        ("train", QUICKSTART, f"model.path={model_dir}", "tokenizer=world", f"training.output_dir={tmp_path / 't'}"),
    ):
        rc, err = run_cli(capsys, *argv)
        assert rc == 2 and "missing keys" in err and "rwkv.blocks.2.att.key.weight" in err, (argv, err)


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"hidden_size": "abc"}, "hidden_size must be a positive integer, got 'abc'"),
        ({"hidden_size": -5}, "hidden_size must be a positive integer, got -5"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ],
)
def test_bad_config_fields_are_named(model_dir, tmp_path, capsys, edit, message):
    edit_config(model_dir, **edit)
    rc, err = run_cli(capsys, "convert", str(model_dir), str(tmp_path / "out"))
    assert rc == 2 and "config.json" in err and message in err


def test_a_config_that_is_not_an_object_and_a_transformers_config_without_fields(model_dir, tmp_path, capsys):
    (model_dir / "config.json").write_text("[1, 2, 3]")
    rc, err = run_cli(capsys, "convert", str(model_dir), str(tmp_path / "a"))
    assert rc == 2 and "config.json" in err and "JSON object" in err and "list" in err
    (model_dir / "config.json").write_text(json.dumps({"model_type": "rwkv", "vocab_size": 97}))
    rc, err = run_cli(capsys, "convert", str(model_dir), str(tmp_path / "b"))
    assert rc == 2 and "'hidden_size' is missing" in err


@pytest.mark.parametrize("version", ["rwkv4", "rwkv7"])
def test_token_ids_outside_the_vocabulary_are_named(version):
    from rwkv_ft.testing import MODEL_FACTORIES

    model = MODEL_FACTORIES[version]()
    with pytest.raises(ValueError, match="token id 100 is outside the model's vocabulary of 97"):
        model(torch.tensor([[1, 100, 2]]))


def test_a_model_whose_tokenizer_does_not_fit_is_refused_at_load(model_dir, capsys):
    from rwkv_ft.tokenizers import load_tokenizer

    load_tokenizer("world").save_pretrained(model_dir)  # 65,536 ids for a 97-row embedding
    rc, err = run_cli(capsys, "generate", str(model_dir), "--prompt", "hi")
    assert rc == 2 and "65536 ids" in err and "97 rows" in err


def test_legacy_non_zip_pth_files_are_read(tmp_path):
    from rwkv_ft import Rwkv4ForCausalLM
    from rwkv_ft.convert import load_blinkdl
    from rwkv_ft.models.rwkv4.conversion_rwkv4 import ours_key_to_blinkdl

    model = randomize_(Rwkv4ForCausalLM(tiny_config()), seed=5)
    state_dict = {ours_key_to_blinkdl(k): v for k, v in model.state_dict().items()}
    torch.save(state_dict, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    loaded = load_blinkdl(tmp_path / "old.pth").state_dict
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rwkv_ft_pwned",))


def test_a_malicious_pickle_is_refused_and_explained(model_dir, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "rwkv", "vocab_size": 97, "hidden_size": 40,
                                                "num_hidden_layers": 2}))  # fmt: skip
    with open(hf / "pytorch_model.bin", "wb") as f:
        pickle.dump({"rwkv.embeddings.weight": _Exploit()}, f)
    rc, err = run_cli(capsys, "convert", str(hf), str(tmp_path / "out"))
    assert rc == 2 and "pytorch_model.bin" in err and "refused to load" in err and "arbitrary code" in err
    assert not Path("/tmp/rwkv_ft_pwned").exists()


# ------------------------------------------------------------------------------------------------
# Network


def test_push_to_a_hub_that_never_answers_times_out(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from rwkv_ft import Rwkv4ForCausalLM
    from rwkv_ft.hub import HubError, push_to_hub

    get_peft_model(Rwkv4ForCausalLM(tiny_config()), LoraConfig(r=2)).save_pretrained(tmp_path / "lora")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()  # never answers
    monkeypatch.setenv("RWKV_FT_HUB_TIMEOUT", "2")
    from huggingface_hub import get_session

    session = get_session()
    saved = session.timeout
    session.timeout = type(saved)(None)  # the newest huggingface_hub's default: no timeout at all
    started = time.monotonic()
    try:
        with pytest.raises(HubError, match="no answer within 2 s.*RWKV_FT_HUB_TIMEOUT"):
            push_to_hub(
                tmp_path / "lora", "me/x", token="hf_test", endpoint=f"http://127.0.0.1:{server.getsockname()[1]}"
            )
    finally:
        session.timeout = saved
        server.close()
    assert time.monotonic() - started < 120  # it gave up (it used to wait forever)


def test_a_model_download_from_a_hub_that_never_answers_times_out(tmp_path, monkeypatch):
    """`model.path` / `rwkv-ft generate` with a Hub id: the download gives up with a clear message."""
    import huggingface_hub.constants
    from huggingface_hub import get_session

    from rwkv_ft.io import resolve_model_source

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()  # never answers
    monkeypatch.setenv("RWKV_FT_HUB_TIMEOUT", "2")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    session = get_session()
    saved = session.timeout
    session.timeout = type(saved)(None)  # the newest huggingface_hub's default: no timeout at all
    started = time.monotonic()
    try:
        with pytest.raises(FileNotFoundError, match="someone/model.*no answer within 2 s.*RWKV_FT_HUB_TIMEOUT"):
            resolve_model_source("someone/model", what="model.path")
    finally:
        session.timeout = saved
        server.close()
    assert accepted, "the request never reached the server"
    assert time.monotonic() - started < 120  # it gave up (it used to wait forever)


def test_convert_without_network_neither_waits_nor_retries(tmp_path, monkeypatch, capsys, caplog):
    """--tokenizer auto on a GPT-NeoX-sized model with no Hub to reach: one failed request (no
    retries), the weights written, and a message saying that no tokenizer was and how to add one."""
    import logging

    import huggingface_hub.constants

    from rwkv_ft import Rwkv4ForCausalLM
    from rwkv_ft.models.rwkv4.conversion_rwkv4 import ours_key_to_blinkdl

    model = Rwkv4ForCausalLM(tiny_config(vocab_size=50277))
    torch.save({ours_key_to_blinkdl(k): v for k, v in model.state_dict().items()}, tmp_path / "pile.pth")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every connection is refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO)
    assert main(["convert", str(tmp_path / "pile.pth"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "no tokenizer written" in out and "ConnectError" in out and "--tokenizer PATH" in out
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert (tmp_path / "out" / "model.safetensors").exists()
