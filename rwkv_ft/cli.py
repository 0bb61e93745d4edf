"""The `rwkv-ft` command line."""

from __future__ import annotations

import argparse
import sys

from rwkv_ft.convert import DTYPES


def _convert(args: argparse.Namespace) -> None:
    from rwkv_ft.convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.out_dir, tokenizer=args.tokenizer, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def _export(args: argparse.Namespace) -> None:
    from rwkv_ft.convert import export_model

    out = export_model(args.model_dir, args.out, format=args.format, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def _generate(args: argparse.Namespace) -> None:
    from rwkv_ft.generation import generate_text

    print(generate_text(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkv-ft", description="Fine-tune, convert and ship RWKV models.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    return parser


def main(argv: list[str] | None = None) -> int:
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
