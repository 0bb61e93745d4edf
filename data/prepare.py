#!/usr/bin/env python
"""Download a public instruction dataset and write it as jsonl in the rwkv_ft message format.

Each output line is ``{"messages": [{"role": ..., "content": ...}, ...]}`` (user turns from Alpaca
rows with an input also carry ``"input"``). Rows that fail validation are skipped and counted;
``--strict`` stops at the first one instead. Examples::

    python data/prepare.py alpaca-cleaned -o data/alpaca_cleaned.jsonl
    python data/prepare.py sharegpt-vicuna -o data/sharegpt_vicuna.jsonl --limit 20000
    python data/prepare.py some-org/some-dataset --format sharegpt -o out.jsonl
    python data/prepare.py local_file.json -o converted.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Let the script run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from rwkv_ft.data.messages import FORMATS, DataError  # noqa: E402
from rwkv_ft.data.sources import convert_rows, log_skips, open_source  # noqa: E402

# Short names for the datasets we use most; anything else is passed to datasets.load_dataset.
PRESETS: dict[str, dict[str, Any]] = {
    "alpaca-cleaned": {"name": "yahma/alpaca-cleaned", "format": "alpaca", "hub_kwargs": {}},
    "sharegpt-vicuna": {
        "name": "anon8231489123/ShareGPT_Vicuna_unfiltered",
        "format": "sharegpt",
        # The repository holds raw JSON files; this is the cleaned, split one.
        "hub_kwargs": {"data_files": "ShareGPT_V3_unfiltered_cleaned_split.json"},
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert a Hub dataset (or a local .json/.jsonl/.parquet file) into rwkv_ft message-format jsonl.",
        epilog="presets: " + ", ".join(f"{key} ({preset['name']})" for key, preset in PRESETS.items()),
    )
    parser.add_argument("dataset", help="a preset name, a Hub dataset name, or a local file")
    parser.add_argument("-o", "--output", required=True, type=Path, help="jsonl file to write")
    parser.add_argument("--format", default=None, choices=["auto", *FORMATS], help="input format (default: auto)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--data-files", default=None, help="data_files for datasets.load_dataset")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many converted rows")
    parser.add_argument("--strict", action="store_true", help="stop at the first invalid row")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """(source, format, load_dataset kwargs) from a preset or the raw arguments."""
    preset = PRESETS.get(args.dataset, {"name": args.dataset, "format": "auto", "hub_kwargs": {}})
    hub_kwargs = dict(preset["hub_kwargs"])
    if args.data_files:
        hub_kwargs["data_files"] = args.data_files
    return preset["name"], args.format or preset["format"], hub_kwargs


def to_json_line(messages: list[dict[str, Any]]) -> str:
    return json.dumps({"messages": messages}, ensure_ascii=False)


def convert(args: argparse.Namespace) -> dict[str, int]:
    """Write the converted rows to args.output; return skipped-row counts per reason."""
    source, data_format, hub_kwargs = resolve(args)
    if args.output.exists() and not args.overwrite:
        raise SystemExit(f"error: {args.output} exists; pass --overwrite to replace it")
    if Path(source).exists() and Path(source).resolve() == args.output.resolve():
        raise SystemExit("error: the output file must differ from the input file")
    name, rows = open_source(source, split=args.split, hub_kwargs=hub_kwargs)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    skipped: Counter[str] = Counter()
    first_problem: DataError | None = None
    written = 0
    with partial.open("w", encoding="utf-8") as out:
        for messages, _origin, error in tqdm(convert_rows(rows, name, format=data_format), unit=" rows"):
            if error is not None:
                if args.strict:
                    raise error
                skipped[error.reason] += 1
                first_problem = first_problem or error
                continue
            out.write(to_json_line(messages) + "\n")
            written += 1
            if args.limit is not None and written >= args.limit:
                break
    os.replace(partial, args.output)  # only a finished conversion takes the output name
    if skipped:
        log_skips(skipped, written + sum(skipped.values()), f"of {name}", first_problem)
    print(f"wrote {written} conversations to {args.output}")
    return dict(skipped)


def main(argv: list[str] | None = None) -> int:
    # Our own logger only: the Hub libraries already print their warnings themselves.
    data_logger = logging.getLogger("rwkv_ft.data")
    data_logger.addHandler(logging.StreamHandler())
    data_logger.setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        convert(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        partial = args.output.with_name(args.output.name + ".partial")
        partial.unlink(missing_ok=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
