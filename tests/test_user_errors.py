"""Bad input from a user: every command exits 2 with one message naming the file, key or argument,
says what to do, prints no traceback and writes nothing half-done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rwkv_ft.cli import main
from rwkv_ft.testing import randomize_, tiny_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
TINY = [
    "model.config={vocab_size: 65536, hidden_size: 32, num_hidden_layers: 2}",
    "data.max_length=64",
    "training.max_steps=1",
    "merge.enabled=false",
    "generate.prompt=null",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test here may touch the network: an empty Hub cache and HF_HUB_OFFLINE=1."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return rc, out, err


@pytest.fixture(scope="module")
def world_model(tmp_path_factory) -> Path:
    """One of our model directories with a 65,536-row embedding and the World tokenizer."""
    from rwkv_ft import Rwkv4ForCausalLM
    from rwkv_ft.tokenizers import load_tokenizer

    path = tmp_path_factory.mktemp("world") / "model"
    randomize_(Rwkv4ForCausalLM(tiny_config(vocab_size=65536, hidden_size=32)), seed=3).save_pretrained(path)
    load_tokenizer("world").save_pretrained(path)
    return path


def truncated_copy(model_dir: Path, dest: Path) -> Path:
    """A copy of `model_dir` whose model.safetensors lost its second half (an interrupted copy)."""
    dest.mkdir(parents=True)
    for item in model_dir.iterdir():
        data = item.read_bytes()
        (dest / item.name).write_bytes(data[: len(data) // 2] if item.name == "model.safetensors" else data)
    return dest


# ------------------------------------------------------------------------------------------------
# Model paths


def test_train_with_a_missing_model_path_fails_before_any_data_work(tmp_path, capsys, monkeypatch):
    import rwkv_ft.data

    def no_data_work(*args, **kwargs):
        raise AssertionError("the data was loaded before the model path was checked")

    monkeypatch.setattr(rwkv_ft.data, "prepare_sft_data", no_data_work)
    out_dir = tmp_path / "out"
    rc, _, err = run_cli(
        capsys, "train", QUICKSTART, "model.path=models/rwkv4-world-1b5", f"training.output_dir={out_dir}"
    )
    assert rc == 2 and "models/rwkv4-world-1b5" in err and "HF_HUB_OFFLINE" in err
    assert not (out_dir / "base").exists() and not list(out_dir.glob("checkpoint-*"))


def test_generate_with_a_missing_model_dir(capsys):
    rc, _, err = run_cli(capsys, "generate", "/nonexistent", "--prompt", "hi")
    assert rc == 2 and "/nonexistent" in err and "no such" in err


# ------------------------------------------------------------------------------------------------
# Truncated weights, in every command that reads them


def test_truncated_safetensors_is_named_everywhere(world_model, tmp_path, capsys):
    broken = truncated_copy(world_model, tmp_path / "broken")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "state_tuning.safetensors").write_bytes(b"")  # never reached: the base fails first
    commands = [
        ("convert", str(broken), str(tmp_path / "c")),
        ("export", str(broken), str(tmp_path / "e.pth"), "--format", "pth"),
        ("generate", str(broken), "--prompt", "hi"),
        ("train", QUICKSTART, f"model.path={broken}", f"training.output_dir={tmp_path / 't'}", *TINY[1:]),
    ]
    for argv in commands:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2, argv
        assert "model.safetensors" in err and "truncated" in err, (argv, err)
    for leftover in ("c", "e.pth"):
        assert not (tmp_path / leftover).exists()


def test_truncated_base_in_merge_is_named(world_model, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(world_model), LoraConfig(r=2))
    model.save_pretrained(tmp_path / "adapter")
    broken = truncated_copy(world_model, tmp_path / "broken")
    rc, _, err = run_cli(capsys, "merge", str(broken), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert rc == 2 and "model.safetensors" in err and not (tmp_path / "merged").exists()


# ------------------------------------------------------------------------------------------------
# Data files


GOOD = json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi!"})


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("empty.jsonl", b"", "empty"),
        ("blank.jsonl", b"\n  \n\n", "empty"),
        (
            "latin1.jsonl",
            (GOOD + "\n").encode() * 3 + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"),
            "line 4.*not UTF-8.*0xe9",
        ),
        ("utf16.jsonl", (GOOD + "\n").encode("utf-16"), "UTF-16"),
        ("all_bad.jsonl", b'[1, 2]\n{"instruction": "x", "output": ""}\n', "all 2 rows were rejected"),
        ("empty.json", b"", "empty"),
    ],
)
def test_unreadable_data_files_are_named(tmp_path, capsys, name, content, expected):
    data = tmp_path / name
    data.write_bytes(content)
    before = data.read_bytes()
    argv = ["train", QUICKSTART, *TINY, f"data.path={data}", f"training.output_dir={tmp_path / 'out'}", "--no-strict"]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and name in err
    import re

    assert re.search(expected, err), err
    assert data.read_bytes() == before


def test_deeply_nested_json_row(tmp_path):
    from rwkv_ft.data import DataError, load_conversations

    data = tmp_path / "deep.jsonl"
    data.write_text("\n".join([GOOD, "[" * 5000 + "]" * 5000, GOOD]) + "\n")
    with pytest.raises(DataError, match=r"deep\.jsonl, line 2: .*nested too deeply"):
        load_conversations(data)
    loaded = load_conversations(data, strict=False)
    assert len(loaded) == 2 and loaded.skipped == {"malformed_json": 1}


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    from rwkv_ft.data import load_conversations

    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n").encode() * 2)
    assert len(load_conversations(data)) == 2


# ------------------------------------------------------------------------------------------------
# Tokenizers at conversion


def blinkdl_pth(tmp_path: Path, vocab: int) -> Path:
    from rwkv_ft import Rwkv4ForCausalLM
    from rwkv_ft.models.rwkv4.conversion_rwkv4 import ours_key_to_blinkdl

    model = randomize_(Rwkv4ForCausalLM(tiny_config(vocab_size=vocab)), seed=1)
    path = tmp_path / f"v{vocab}.pth"
    torch.save({ours_key_to_blinkdl(k): v for k, v in model.state_dict().items()}, path)
    return path


def test_convert_without_a_known_tokenizer_writes_weights_and_says_so(tmp_path, capsys):
    for vocab, why in ((1000, "matches no tokenizer"), (50277, "HF_HUB_OFFLINE=1")):
        rc, out, _ = run_cli(capsys, "convert", str(blinkdl_pth(tmp_path, vocab)), str(tmp_path / f"o{vocab}"))
        assert rc == 0 and "no tokenizer written" in out and why in out and "--tokenizer PATH" in out
        assert (tmp_path / f"o{vocab}" / "model.safetensors").exists()
        assert not (tmp_path / f"o{vocab}" / "tokenizer_config.json").exists()


def test_convert_names_the_tokenizer_it_chose(tmp_path, capsys):
    neox = ROOT.parent / "shared" / "fixtures" / "20B_tokenizer.json"
    rc, out, _ = run_cli(capsys, "convert", str(blinkdl_pth(tmp_path, 65536)), str(tmp_path / "w"))
    assert rc == 0 and "tokenizer: the world tokenizer" in out
    if neox.exists():
        rc, out, _ = run_cli(
            capsys, "convert", str(blinkdl_pth(tmp_path, 50277)), str(tmp_path / "n"), "--tokenizer", str(neox)
        )
        assert rc == 0 and f"tokenizer: {neox}" in out


def test_a_tokenizer_that_does_not_fit_the_embedding_is_refused(tmp_path, capsys):
    rc, _, err = run_cli(
        capsys, "convert", str(blinkdl_pth(tmp_path, 1000)), str(tmp_path / "o"), "--tokenizer", "world"
    )
    assert rc == 2 and "65536 ids" in err and "1000 rows" in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    "flag,value,message",
    [("--temperature", "-1", ">= 0"), ("--top-p", "0", "(0, 1]"), ("--max-new-tokens", "0", "positive")],
)
def test_out_of_range_sampling_arguments_are_refused(capsys, flag, value, message):
    with pytest.raises(SystemExit) as info:
        main(["generate", "model", "--prompt", "hi", flag, value])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_version_and_train_help_name_themselves(capsys):
    from rwkv_ft import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"rwkv-ft {__version__}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert capsys.readouterr().out.startswith("usage: rwkv-ft train")


def test_recipe_values_out_of_range_are_named(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", QUICKSTART, "training.batch_size=0", f"training.output_dir={tmp_path}")
    assert rc == 2 and "training.batch_size must be >= 1" in err


def test_offloaded_long_context_chunks_with_cuda_graphs_are_refused(tmp_path, capsys):
    rc, _, err = run_cli(
        capsys, "train", QUICKSTART, "training.chunk_len=64", "training.chunk_offload=0.5",
        "training.compile=reduce-overhead", f"training.output_dir={tmp_path}",
    )  # fmt: skip
    assert rc == 2 and "training.chunk_offload cannot be combined with training.compile: reduce-overhead" in err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_deeply_nested_row_stops_a_strict_run_naming_the_line(tmp_path, capsys):
    data = tmp_path / "deep.jsonl"
    data.write_text("\n".join([GOOD, "[" * 5000 + "]" * 5000, GOOD]) + "\n")
    argv = ["train", QUICKSTART, *TINY, f"data.path={data}", f"training.output_dir={tmp_path / 'out'}"]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and "deep.jsonl, line 2" in err and "nested too deeply" in err
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "adapter").exists()
    assert not (tmp_path / "out" / "base").exists()  # the data is read before the base model is built


# ------------------------------------------------------------------------------------------------
# As a user's shell sees it: a fresh process, the newest releases' warnings and all


def cli(*argv: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    """`rwkv-ft ARGV` in a fresh process, offline (a test never touches the network)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rwkv_ft.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_import_and_help_load_nothing_heavy_and_print_no_warnings():
    import subprocess
    import sys

    heavy = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate")
    probe = f"import sys, rwkv_ft; print([m for m in {heavy!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]" and proc.stderr == "", proc.stderr
    for argv in (["--help"], ["train", "--help"], ["generate", "--help"], ["--version"]):
        rc, out, err = cli(*argv)
        assert rc == 0 and out and err == "", (argv, err)


def test_error_paths_print_one_line_and_nothing_else(tmp_path):
    """Bad input in a fresh process: exit 2 and a single line on stderr (no warning from a library
    imported on the way, no traceback), nothing written."""
    out = tmp_path / "out"
    commands = [
        ("generate", "/nonexistent", "--prompt", "hi"),
        ("convert", str(tmp_path / "missing.pth"), str(out)),
        ("train", QUICKSTART, "model.path=models/rwkv4-world-1b5", f"training.output_dir={out}"),
        ("train", QUICKSTART, *TINY, f"data.path={tmp_path / 'nothing.jsonl'}", f"training.output_dir={out}"),
    ]
    for argv in commands:
        rc, _, err = cli(*argv)
        assert rc == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"rwkv-ft {argv[0]}: error: "), (argv, err)
        assert not out.exists(), argv
