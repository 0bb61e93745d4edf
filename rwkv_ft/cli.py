"""The `rwkv-ft` command line. Imports nothing heavy until a subcommand runs, so `--help` is instant."""

from __future__ import annotations

import argparse
import sys

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a path, a file, an argument, a diverging run), not a bug:
    reported in one line, exit status 2, no traceback."""
    return (ValueError, OSError, FloatingPointError)


def _convert(args: argparse.Namespace) -> None:
    from rwkv_ft.convert import convert_checkpoint

    out = convert_checkpoint(
        args.src, args.out_dir, tokenizer=args.tokenizer, dtype=args.dtype, overwrite=args.overwrite, report=print
    )
    print(f"wrote {out}")


def _export(args: argparse.Namespace) -> None:
    from rwkv_ft.convert import export_model

    out = export_model(args.model_dir, args.out, format=args.format, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def _generate(args: argparse.Namespace) -> None:
    from rwkv_ft.generation import generate_text

    print(
        generate_text(
            args.model_dir,
            args.prompt,
            chat=args.chat,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            dtype=args.dtype,
            device=args.device,
        )
    )


def _merge(args: argparse.Namespace) -> None:
    from rwkv_ft.merge import merge_adapter

    report = merge_adapter(
        args.base, args.adapter, args.out, dtype=args.dtype, format=args.format, overwrite=args.overwrite
    )
    merged = " + ".join(report.merged) or "nothing"
    dtype = str(report.dtype).removeprefix("torch.")
    print(f"merged {merged} into {args.base} ({dtype}, {report.format} format)")
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote {report.out}")


def _push(args: argparse.Namespace) -> None:
    from rwkv_ft.hub import push_to_hub

    url = push_to_hub(args.dir, args.repo_id, private=args.private, commit_message=args.commit_message)
    print(f"uploaded {args.dir} to {args.repo_id}: {url}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = greedy), got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from rwkv_ft import __version__

    parser = argparse.ArgumentParser(prog="rwkv-ft", description="Fine-tune, convert and ship RWKV models.")
    parser.add_argument("--version", action="version", version=f"rwkv-ft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # `rwkv-ft train ...` hands its arguments to the training entry point (see main()).
    sub.add_parser(
        "train", help="fine-tune from a recipe (same as: python -m rwkv_ft.train RECIPE ...)", add_help=False
    )

    p = sub.add_parser("convert", help="BlinkDL .pth or another library's RWKV directory -> rwkv_ft directory")
    p.add_argument("src", help="a BlinkDL .pth (RWKV-4 or RWKV-7), a transformers or fla RWKV directory")
    p.add_argument("out_dir")
    p.add_argument(
        "--tokenizer", default="auto", help="world | neox | none | PATH (default: the one the vocabulary size means)"
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="rwkv_ft directory -> BlinkDL .pth or another library's directory")
    p.add_argument("model_dir")
    p.add_argument("out", help="the .pth file (the extension is added if missing) or output directory")
    p.add_argument("--format", choices=["pth", "transformers"], required=True)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_export)

    p = sub.add_parser("generate", help="generate text from a model or adapter directory")
    p.add_argument("model_dir", help="one of our model directories, or an adapter directory (LoRA or state tuning)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="raw text to continue")
    text.add_argument("--chat", metavar="MESSAGE", help="a user message, formatted with the model's chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=_probability, default=0.9, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="seed the sampling")
    p.add_argument("--dtype", choices=("auto", *DTYPE_CHOICES), default="auto", help="default: as saved")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("merge", help="fold a LoRA/DoRA (and state-tuning) adapter into its base model")
    p.add_argument("base", help="full-precision base: rwkv_ft dir, BlinkDL .pth or another library's RWKV dir")
    p.add_argument("adapter", help="the adapter directory (peft adapter and/or state_tuning.safetensors)")
    p.add_argument("out", help="output directory (a .pth file for --format pth)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="written dtype (default: BASE's)")
    p.add_argument("--format", choices=["hf", "pth", "transformers"], default="hf", help="hf: rwkv_ft dir")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_merge)

    p = sub.add_parser("push", help="upload an adapter or model directory to the Hugging Face Hub")
    p.add_argument("dir")
    p.add_argument("repo_id", help="e.g. your-name/rwkv7-lora")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--commit-message", default=None)
    p.set_defaults(func=_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from rwkv_ft.train import main as train_main

        return train_main(argv[1:], prog="rwkv-ft train")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except user_errors() as exc:
        print(f"rwkv-ft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
