"""Instruction tuning entry point: `accelerate launch -m rwkv_ft.train RECIPE [section.key=value ...]`.

Also reachable as `rwkv-ft train RECIPE`. Builds the base model (from a checkpoint or a config),
wraps it with the recipe's adapter (LoRA, QLoRA on an 8-/4-bit base, state tuning, or none), loads
and masks the data, trains with the Hugging Face `Trainer`, and leaves in `training.output_dir`:

    adapter/ (or model/ for full fine-tuning)   the result, safetensors
    checkpoint-N/                             resumable checkpoints, each written atomically
    runs/                                     tensorboard logs
    loss_curve.png, training_summary.json     the loss curve and final numbers
    merged/                                   the merged model, when merge.enabled
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import rwkv_ft  # noqa: F401  (registers the Auto classes)
from rwkv_ft.convert import DTYPES, model_type_of
from rwkv_ft.recipe import Recipe, RecipeError, load_recipe

logger = logging.getLogger("rwkv_ft.train")


# --------------------------------------------------------------------------------------------------
# Model, tokenizer, adapter


def prepare_base_model(recipe: Recipe, output_dir: Path) -> Path:
    """A directory of ours holding the base model: the recipe's own, or one we write once to output_dir/base.

    A BlinkDL `.pth` or transformers directory is converted; a `model.config` builds a fresh random
    model (seeded), so a resumed run and the merge step see exactly the same base.
    """
    from rwkv_ft.convert import convert_checkpoint

    spec = recipe.model
    base = output_dir / "base"
    if spec.path is None:
        if spec.config is None:
            raise RecipeError("recipe: set model.path (a checkpoint) or model.config (a model built from scratch)")
        if _is_main_process() and not (base / "config.json").exists():
            from rwkv_ft import Rwkv4Config, Rwkv4ForCausalLM

            torch.manual_seed(recipe.training.seed)
            Rwkv4ForCausalLM(Rwkv4Config(**spec.config)).save_pretrained(base)
        _wait_for_everyone()  # every rank, unconditionally: a rank that skipped it would hang the others
        return base
    path = Path(spec.path)
    if path.is_dir() and model_type_of(path) == "rwkv4":
        return path
    if path.exists():
        if _is_main_process() and not (base / "config.json").exists():
            convert_checkpoint(path, base, tokenizer="none", overwrite=True)
        _wait_for_everyone()
        return base
    return Path(spec.path)  # a Hub model id: from_pretrained fetches it


def load_tokenizer_for(recipe: Recipe, base: Path):
    from rwkv_ft.tokenizers import load_tokenizer

    if recipe.tokenizer is not None:
        return load_tokenizer(recipe.tokenizer)
    if base.is_dir() and any((base / f).exists() for f in ("tokenizer_config.json", "tokenizer.json")):
        return load_tokenizer(str(base))
    vocab = json.loads((base / "config.json").read_text())["vocab_size"] if base.is_dir() else None
    if vocab == 65536:
        return load_tokenizer("world")
    raise RecipeError(f"recipe: the base model {base} has no tokenizer; set `tokenizer:` (world, neox or a path)")


def load_model(recipe: Recipe, base: Path):
    """The base model in the recipe's dtype, quantized with bitsandbytes when asked."""
    from transformers import AutoModelForCausalLM

    spec = recipe.model
    kwargs: dict[str, Any] = {"dtype": DTYPES[spec.dtype]}
    if spec.quantization is not None:
        from rwkv_ft.quantization import bnb_config

        kwargs["quantization_config"] = bnb_config(spec.quantization, compute_dtype=DTYPES[spec.dtype])
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    model.config.wkv_backend = spec.wkv_backend
    for block in model.rwkv.blocks:
        block.att.wkv_backend = spec.wkv_backend
    return model


def attach_adapter(model, recipe: Recipe):
    """Wrap `model` as the recipe says; everything not trained is frozen."""
    spec, quantized = recipe.adapter, recipe.model.quantization is not None
    gradient_checkpointing = recipe.training.gradient_checkpointing
    if quantized:
        from rwkv_ft.quantization import prepare_for_kbit_training

        frozen_dtype = DTYPES[recipe.model.dtype] if recipe.model.dtype != "fp32" else None
        model = prepare_for_kbit_training(
            model, gradient_checkpointing=gradient_checkpointing, frozen_dtype=frozen_dtype
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.type != "none":
            model.enable_input_require_grads()
    if spec.type == "none":
        if quantized:
            raise RecipeError("recipe: adapter.type none (full fine-tuning) cannot train a quantized base")
        return model
    if spec.type == "state":
        from rwkv_ft.adapters import StateTuningConfig, add_state_tuning

        add_state_tuning(model, StateTuningConfig(train_token_shift=spec.train_token_shift))
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        modules_to_save=spec.modules_to_save,
        use_dora=spec.use_dora,
        use_rslora=spec.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# --------------------------------------------------------------------------------------------------
# Trainer pieces


class RwkvTrainer(Trainer):
    """The HF Trainer with two guarantees: a non-finite loss stops training at once, naming the
    step, before the optimizer sees it; and checkpoints appear only complete (written to a staging
    folder, then renamed), so a crash mid-save never leaves a checkpoint that `--resume` would pick."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            step = self.state.global_step + 1
            raise FloatingPointError(
                f"loss is {loss.item()} at step {step} (epoch {self.state.epoch:.2f}); training stopped before "
                f"the optimizer step. The last checkpoint is intact. Try a lower training.lr, "
                f"training.precision=bf16 instead of fp16, or check the data around this step."
            )
        return loss

    def _get_output_dir(self, trial):
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging_dir = os.path.join(run_dir, ".staging")
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(run_dir, ".staging", name), final)
            shutil.rmtree(os.path.join(run_dir, ".staging"), ignore_errors=True)
            self._keep_latest_checkpoints(run_dir)
        self.accelerator.wait_for_everyone()

    def _keep_latest_checkpoints(self, run_dir: str) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        for old in complete_checkpoints(Path(run_dir))[:-limit]:
            shutil.rmtree(old, ignore_errors=True)


class LossCurveCallback(TrainerCallback):
    """Writes loss_curve.png (train and eval loss against the step) whenever training ends."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss_curve(state.log_history, self.output_dir / "loss_curve.png")


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("rwkv_ft training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders holding a trainer_state.json, oldest first."""
    found = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and (path / "trainer_state.json").exists():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def training_arguments(recipe: Recipe, output_dir: Path, has_eval: bool) -> TrainingArguments:
    t = recipe.training
    eval_strategy = "no" if not has_eval else ("steps" if t.eval_steps else "epoch")
    save_strategy = "steps" if t.save_steps else "epoch"
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_steps or (t.warmup_ratio if 0 < t.warmup_ratio < 1 else 0),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        logging_steps=t.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=save_strategy,
        save_steps=t.save_steps,
        save_total_limit=None,  # RwkvTrainer keeps the newest `training.save_total_limit` itself
        seed=t.seed,
        data_seed=t.seed,
        report_to=["tensorboard"],
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        dataloader_num_workers=t.dataloader_workers,
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
    )


# --------------------------------------------------------------------------------------------------
# The run


def run(recipe: Recipe, *, resume: bool = False, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train as `recipe` says. Returns the training summary (also written to training_summary.json)."""
    from rwkv_ft.data import SFTDataCollator, prepare_sft_data

    output_dir = Path(recipe.training.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = _checkpoint_to_resume(output_dir) if resume else None
    if not resume and complete_checkpoints(output_dir):
        raise RecipeError(
            f"{output_dir} already holds checkpoints; pass --resume to continue that run, "
            "or choose another training.output_dir"
        )
    set_seed(recipe.training.seed)
    base = prepare_base_model(recipe, output_dir)
    tokenizer = load_tokenizer_for(recipe, base)
    if _is_main_process() and base == output_dir / "base" and not (base / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(base)  # so the merged model, built from base, carries it too
    _wait_for_everyone()
    data = prepare_sft_data(
        recipe.data.path,
        tokenizer,
        template=recipe.data.template,
        max_length=recipe.data.max_length,
        format=recipe.data.format,
        split=recipe.data.split,
        strict=recipe.data.strict,
        append_eos=recipe.data.append_eos,
        pack=recipe.data.pack,
        eval_fraction=recipe.data.eval_fraction,
        eval_size=recipe.data.eval_size,
        seed=recipe.training.seed,
    )
    if data.skipped:
        logger.warning("skipped rows: %s", ", ".join(f"{n} {reason}" for reason, n in sorted(data.skipped.items())))
    if len(data.train) == 0:
        raise RecipeError(f"data.path {recipe.data.path}: no training examples left after validation and truncation")

    model = attach_adapter(load_model(recipe, base), recipe)
    _log_trainable(model)
    has_eval = data.eval is not None and len(data.eval) > 0
    trainer = RwkvTrainer(
        model=model,
        args=training_arguments(recipe, output_dir, has_eval),
        train_dataset=data.train,
        eval_dataset=data.eval if has_eval else None,
        data_collator=SFTDataCollator.from_tokenizer(tokenizer),
        processing_class=tokenizer,
        callbacks=[LossCurveCallback(output_dir), *(callbacks or [])],
    )
    train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics = trainer.evaluate() if has_eval else {}

    summary = {
        "base_model": str(recipe.model.path or base),
        "adapter": recipe.adapter.type,
        "quantization": recipe.model.quantization,
        "data": recipe.data.path,
        "steps": trainer.state.global_step,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "train_loss": train_output.training_loss,
        "eval_loss": metrics.get("eval_loss"),
        "skipped_rows": data.skipped,
        "recipe": recipe.to_dict(),
    }
    if trainer.is_world_process_zero():
        result_dir = save_result(trainer.model, tokenizer, recipe, output_dir, summary)
        summary["result_dir"] = str(result_dir)
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
        if recipe.merge.enabled and recipe.adapter.type != "none":
            summary["merged_dir"] = str(merge_result(base, result_dir, recipe, output_dir))
    trainer.accelerator.wait_for_everyone()
    return summary


def _checkpoint_to_resume(output_dir: Path) -> Path:
    checkpoints = complete_checkpoints(output_dir)
    if not checkpoints:
        raise RecipeError(f"--resume: no complete checkpoint in {output_dir} to resume from")
    return checkpoints[-1]


def save_result(model, tokenizer, recipe: Recipe, output_dir: Path, summary: dict[str, Any]) -> Path:
    """Save the adapter (or the full model) with the tokenizer and the training summary."""
    from rwkv_ft.convert import write_atomically

    result_dir = output_dir / ("model" if recipe.adapter.type == "none" else "adapter")

    def write(tmp: Path) -> None:
        if recipe.adapter.type == "none":
            model.save_pretrained(tmp)
        else:
            from rwkv_ft.adapters import save_adapter

            save_adapter(
                model,
                tmp,
                base_model=summary["base_model"],
                extra={"data": summary["data"], "recipe": summary["recipe"]},
            )
        tokenizer.save_pretrained(tmp)
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str))

    return write_atomically(result_dir, write, overwrite=True)


def merge_result(base: Path, adapter_dir: Path, recipe: Recipe, output_dir: Path) -> Path:
    from rwkv_ft.merge import merge_adapter

    out = output_dir / ("merged.pth" if recipe.merge.format == "pth" else "merged")
    report = merge_adapter(base, adapter_dir, out, dtype=recipe.merge.dtype, format=recipe.merge.format, overwrite=True)
    for note in report.notes:
        logger.warning("merge: %s", note)
    return report.out


def _log_trainable(model) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "trainable parameters: %s of %s (%.3f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )


def _distributed_state():
    """accelerate's process state, set up before anything touches the disk, so that rank 0 alone
    writes shared files (the base model) while the others wait. CPU-only machines train with gloo."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _is_main_process() -> bool:
    return _distributed_state().is_main_process


def _wait_for_everyone() -> None:
    _distributed_state().wait_for_everyone()


# --------------------------------------------------------------------------------------------------
# Sample generation after training


def sample_generation(model_dir: Path, recipe: Recipe) -> str:
    """Greedy answer of the merged model to `generate.prompt`, rendered with the recipe's template."""
    from transformers import AutoModelForCausalLM

    from rwkv_ft.data import get_template
    from rwkv_ft.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = get_template(recipe.data.template).generation_prompt([{"role": "user", "content": recipe.generate.prompt}])
    inputs = tokenizer(prompt, return_tensors="pt")
    temperature = recipe.generate.temperature
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": 0.9} if temperature > 0 else {"do_sample": False}
    )
    torch.manual_seed(recipe.training.seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=recipe.generate.max_new_tokens, **sampling)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answer.split("\n\n")[0].strip() or answer  # the template ends every turn with a blank line


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwkv_ft.train",
        description="Fine-tune an RWKV model from a recipe. Example: "
        "accelerate launch -m rwkv_ft.train recipes/rwkv4_alpaca_lora.yaml training.lr=1e-4",
    )
    parser.add_argument("recipe", help="a recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.max_steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    strict = parser.add_mutually_exclusive_group()
    strict.add_argument(
        "--strict", dest="strict", action="store_true", default=None, help="stop at the first bad data row"
    )
    strict.add_argument("--no-strict", dest="strict", action="store_false", help="skip bad data rows and count them")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.strict is not None:
        overrides.append(f"data.strict={str(args.strict).lower()}")
    try:
        recipe = load_recipe(args.recipe, overrides)
        summary = run(recipe, resume=args.resume)
        if _is_main_process():
            _report(summary, recipe)
    except (RecipeError, FileNotFoundError, FloatingPointError, ValueError) as exc:
        print(f"rwkv_ft.train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _report(summary: dict[str, Any], recipe: Recipe) -> None:
    out = Path(recipe.training.output_dir)
    lines = [
        f"train loss {summary['train_loss']:.4f}"
        + (f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] else ""),
        f"result: {summary.get('result_dir')}",
        f"loss curve: {out / 'loss_curve.png'}; tensorboard --logdir {out / 'runs'}",
    ]
    if "merged_dir" in summary:
        lines.append(f"merged model: {summary['merged_dir']}")
        if recipe.generate.prompt and recipe.merge.format == "hf":
            answer = sample_generation(Path(summary["merged_dir"]), recipe)
            lines.append(f"sample: {recipe.generate.prompt!r} -> {answer!r}")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
