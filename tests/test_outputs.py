"""What training, export and merge write works wherever it is used: adapters and exports generate
from another folder, tokenizers carry the chat template the model was trained with, every folder
has a real model card, and files get the user's umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from rwkv_ft.cli import main
from rwkv_ft.data import get_template, list_templates
from rwkv_ft.recipe import load_recipe
from rwkv_ft.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.config={vocab_size: 65536, hidden_size: 32, num_hidden_layers: 2}",
    "data.max_length=64",
    "training.batch_size=4",
    "training.max_steps=2",
    "training.logging_steps=1",
    "adapter.dropout=0.0",
    "generate.prompt=null",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi\n\n\nthere  "}],
    [
        {"role": "system", "content": "Be brief.\n\nAlways."},
        {"role": "user", "content": "Q1", "input": "an input\n\nwith a blank line"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2 'quoted' \\ backslash"},
    ],
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A LoRA run and a state-tuning run with relative paths in one folder; returns that folder."""
    from rwkv_ft.train import run

    root = tmp_path_factory.mktemp("outputs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for name, extra in (("lora", ["merge.enabled=true"]), ("state", ["adapter.type=state", "merge.enabled=false"])):
            overrides = [*TINY, f"training.output_dir=runs/{name}", f"data.path={ROOT / 'data/alpaca_sample.jsonl'}"]
            run(load_recipe(ROOT / "recipes" / "quickstart.yaml", [*overrides, *extra]))
    finally:
        os.chdir(cwd)
    return root / "runs"


def generate(capsys, *argv: str) -> str:
    assert main(["generate", *argv]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return out


def test_adapters_record_an_absolute_base_and_generate_from_anywhere(trained, tmp_path, capsys, monkeypatch):
    info = json.loads((trained / "lora" / "adapter" / "adapter_config.json").read_text())
    assert Path(info["base_model_name_or_path"]).is_absolute()
    assert Path(info["base_model_name_or_path"]) == (trained / "lora" / "base").resolve()
    monkeypatch.chdir(tmp_path)
    for adapter in (trained / "lora" / "adapter", trained / "state" / "adapter"):
        text = generate(capsys, str(adapter), "--prompt", "User: hi\n\nAssistant:", "--max-new-tokens", "4")
        assert isinstance(text, str)


def test_a_base_from_the_hub_is_recorded_by_its_hub_id(tmp_path, monkeypatch):
    """A base named by its Hub id (here from a prepared local Hub cache) is recorded as that id, not
    as the cache folder, so the adapter loads on any machine."""
    import huggingface_hub.constants

    from rwkv_ft import Rwkv4ForCausalLM
    from rwkv_ft.testing import tiny_config
    from rwkv_ft.train import prepare_base_model

    cache, revision = tmp_path / "hub", "0" * 40
    repo = cache / "models--someone--tiny-rwkv"
    Rwkv4ForCausalLM(tiny_config()).save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    overrides = ["model.path=someone/tiny-rwkv", "model.config=null", f"training.output_dir={tmp_path / 'run'}"]
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    base, record = prepare_base_model(recipe, tmp_path / "run", tokenizer=None)
    assert record == "someone/tiny-rwkv" and base.resolve() == (repo / "snapshots" / revision).resolve()


def test_state_tuning_adapter_generates_with_its_learned_state(trained, capsys):
    """generate on a state-tuning adapter uses the learned state: same tokens as base + state by hand."""
    from rwkv_ft.adapters import load_state_tuning
    from rwkv_ft.generation import load_for_generation

    adapter = trained / "state" / "adapter"
    model, tokenizer = load_for_generation(adapter)
    base, _ = load_for_generation(trained / "state" / "base")
    ids = tokenizer("User: hi\n\nAssistant:", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        plain = base.generate(ids, **kw)
        load_state_tuning(base, adapter)
        with_state = base.generate(ids, **kw)
        assert torch.equal(model.generate(ids, **kw), with_state)
    learned = model.get_decoder().initial_state
    assert learned is not None and learned.wkv_value.abs().sum() > 0  # trained away from its zero init
    assert plain.shape == with_state.shape


@pytest.mark.parametrize("folder", ["lora/adapter", "lora/merged", "state/adapter", "lora/base"])
def test_saved_tokenizers_carry_the_training_chat_template(trained, folder):
    tokenizer = load_tokenizer(str(trained / folder))
    template = get_template("world")
    for messages in CONVERSATIONS:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == template.generation_prompt(messages)
    whole = [*CONVERSATIONS[1], {"role": "assistant", "content": "A2"}]
    assert tokenizer.apply_chat_template(whole, tokenize=False) == template.render_text(whole)


@pytest.mark.parametrize("name", list_templates())
def test_every_template_renders_the_same_through_jinja(name):
    from rwkv_ft.data import TemplateError

    tokenizer = load_tokenizer("world")
    template = get_template(name)
    tokenizer.chat_template = template.chat_template()
    for messages in [*CONVERSATIONS, [{"role": "user", "content": "x", "input": "y"}]]:
        try:
            expected = template.generation_prompt(messages)
        except TemplateError:  # instruction templates take one exchange: Jinja must refuse too
            with pytest.raises(Exception, match="one user turn"):
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            continue
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
        whole = [*messages, {"role": "assistant", "content": " An answer\n\n\nin two lines "}]
        assert tokenizer.apply_chat_template(whole, tokenize=False) == template.render_text(whole)


def test_generate_chat_uses_the_template_and_stops_at_the_end_of_the_turn(trained, capsys, monkeypatch):
    import rwkv_ft.generation as generation

    seen = {}
    real = generation.chat_prompt

    def spy(tokenizer, message):
        seen["prompt"] = real(tokenizer, message)
        return seen["prompt"]

    monkeypatch.setattr(generation, "chat_prompt", spy)
    out = generate(capsys, str(trained / "lora" / "merged"), "--chat", "Say hi.", "--max-new-tokens", "40")
    assert seen["prompt"] == "User: Say hi.\n\nAssistant:"
    assert "\n\n" not in out.rstrip("\n")


def test_generate_sampling_is_seeded_and_takes_dtype_and_device(trained, capsys):
    args = [str(trained / "lora" / "merged"), "--prompt", "User: hi\n\nAssistant:", "--max-new-tokens", "8"]
    sample = ["--temperature", "1.5", "--top-p", "0.95", "--seed", "3"]
    assert generate(capsys, *args, *sample) == generate(capsys, *args, *sample)
    assert isinstance(generate(capsys, *args, "--dtype", "bf16", "--device", "cpu"), str)


# ------------------------------------------------------------------------------------------------
# Export


def test_export_transformers_carries_the_tokenizer(trained, tmp_path, capsys):
    merged = trained / "lora" / "merged"
    assert main(["export", str(merged), str(tmp_path / "hf"), "--format", "transformers"]) == 0
    ours, theirs = load_tokenizer(str(merged)), load_tokenizer(str(tmp_path / "hf"))
    assert theirs.encode("hi there") == ours.encode("hi there") != []


def test_export_pth_without_extension_writes_a_pth(trained, tmp_path, capsys):
    assert main(["export", str(trained / "lora" / "merged"), str(tmp_path / "model"), "--format", "pth"]) == 0
    assert f"wrote {tmp_path / 'model.pth'}" in capsys.readouterr().out
    assert "emb.weight" in torch.load(tmp_path / "model.pth", weights_only=True)


def test_generate_refuses_a_model_without_a_tokenizer(trained, tmp_path, capsys):
    from rwkv_ft.convert import load_pretrained

    load_pretrained(trained / "lora" / "merged").save_pretrained(tmp_path / "bare")
    assert main(["generate", str(tmp_path / "bare"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer" in err and "--tokenizer" in err


# ------------------------------------------------------------------------------------------------
# Model cards and permissions


@pytest.mark.parametrize("folder", ["lora/adapter", "lora/merged", "state/adapter"])
def test_every_result_folder_has_a_real_model_card(trained, folder):
    card = (trained / folder / "README.md").read_text()
    assert "[More Information Needed]" not in card
    assert "RWKV-4" in card and "alpaca_sample.jsonl" in card and "Final train loss" in card
    assert "apply_chat_template" in card and "`world`" in card
    if folder == "lora/merged":
        assert "Merged with `rwkv-ft merge`" in card


def test_results_get_the_users_umask(tmp_path):
    from rwkv_ft.io import write_atomically

    old = os.umask(0o027)
    try:

        def write(tmp: Path) -> None:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f.txt").write_text("x")

        out = write_atomically(tmp_path / "out", write)
        single = write_atomically(tmp_path / "one.pth", lambda tmp: tmp.write_bytes(b"x"), is_dir=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "sub" / "f.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE(single.stat().st_mode) == 0o640


def test_training_outputs_are_not_private(trained):
    mask = os.umask(0)
    os.umask(mask)
    for path in (trained / "lora" / "adapter", trained / "lora" / "merged", *trained.glob("lora/checkpoint-*")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask, path
