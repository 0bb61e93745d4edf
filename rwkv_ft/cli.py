"""The `rwkv-ft` command line."""

from __future__ import annotations

import argparse
import sys

from rwkv_ft.convert import DTYPES


def _convert(args: argparse.Namespace) -> None:
    from rwkv_ft.convert import convert_checkpoint

    out = convert_checkpoint(
        args.src, args.out_dir, tokenizer=args.tokenizer, dtype=args.dtype, overwrite=args.overwrite
    )
    print(f"wrote {out}")


def _export(args: argparse.Namespace) -> None:
    from rwkv_ft.convert import export_model

    out = export_model(args.model_dir, args.out, format=args.format, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def _generate(args: argparse.Namespace) -> None:
    from rwkv_ft.generation import generate_text

    print(generate_text(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkv-ft", description="Fine-tune, convert and ship RWKV models.")
    sub = parser.add_subparsers(dest="command", required=True)

    # `rwkv-ft train ...` hands its arguments to `python -m rwkv_ft.train` (see main()).
    sub.add_parser(
        "train", help="fine-tune from a recipe (same as: python -m rwkv_ft.train RECIPE ...)", add_help=False
    )

    p = sub.add_parser("convert", help="BlinkDL .pth or transformers RWKV directory -> rwkv_ft directory")
    p.add_argument("src", help="a BlinkDL RWKV-4 .pth file or a transformers RwkvForCausalLM directory")
    p.add_argument("out_dir")
    p.add_argument("--tokenizer", default="auto", help="world | neox | none | PATH (default: from the vocab size)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="rwkv_ft directory -> BlinkDL .pth or transformers RWKV directory")
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--format", choices=["pth", "transformers"], required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_export)

    p = sub.add_parser("generate", help="generate text from a model directory")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.set_defaults(func=_generate)

    p = sub.add_parser("merge", help="fold a LoRA/DoRA (and state-tuning) adapter into its base model")
    p.add_argument("base", help="full-precision base: rwkv_ft dir, BlinkDL .pth or transformers RWKV dir")
    p.add_argument("adapter", help="the adapter directory (peft adapter and/or state_tuning.safetensors)")
    p.add_argument("out", help="output directory (a .pth file for --format pth)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="written dtype (default: BASE's)")
    p.add_argument("--format", choices=["hf", "pth", "transformers"], default="hf", help="hf: rwkv_ft dir")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_merge)

    p = sub.add_parser("push", help="upload an adapter or model directory to the Hugging Face Hub")
    p.add_argument("dir")
    p.add_argument("repo_id", help="e.g. your-name/rwkv4-lora")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--commit-message", default=None)
    p.set_defaults(func=_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from rwkv_ft.train import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"rwkv-ft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
