"""`lab data prep` and `lab data info`."""

from __future__ import annotations

import argparse
import json
import time

from lab.data.format import open_dataset
from lab.data.prep import DEFAULT_VAL_FRACTION, prepare
from lab.errors import ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="lab data",
                       description="Prepare token shards and inspect prepared data.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    prep = sub.add_parser("prep", help="tokenize a corpus into shards plus metadata.json",
                          description="Tokenize a corpus into OUT: shards, then metadata.json.")
    prep.add_argument("--source", default="stdlib",
                      help="stdlib (the default: this Python's standard library), a directory "
                           "of text files, FILE.jsonl or FILE.parquet")
    prep.add_argument("--out", required=True, help="output directory (created atomically)")
    prep.add_argument("--tokenizer", default="byte",
                      help="byte (default), PATH/tokenizer.json, or train:BPE:SIZE")
    prep.add_argument("--include", nargs="+", metavar="GLOB",
                      help="file patterns for a directory source (default: all files; "
                           "*.py for stdlib)")
    prep.add_argument("--field", default="text", help="text field or column (JSONL, Parquet)")
    prep.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                      help=f"share of documents held out for validation ({DEFAULT_VAL_FRACTION})")
    info = sub.add_parser("info", help="print a prepared dataset's metadata")
    info.add_argument("path")
    return p


def main(argv: list[str]) -> int:
    """Runs `lab data ARGV`; user mistakes raise UserError (the caller exits with status 2)."""
    args = build_parser().parse_args(argv)
    if args.command == "info":
        print(json.dumps(open_dataset(args.path).meta, indent=2))
        return 0
    started = time.perf_counter()
    meta = prepare(args.source, args.out, tokenizer=args.tokenizer, include=args.include,
                   text_field=args.field, val_fraction=args.val_fraction, log=print)
    seconds = time.perf_counter() - started
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    total = tr["n_tokens"] + va["n_tokens"]
    print(f"{total:,} tokens (train {tr['n_tokens']:,} in {tr['n_documents']:,} documents, "
          f"val {va['n_tokens']:,} in {va['n_documents']:,}), vocab {meta['vocab_size']}, "
          f"{meta['dtype']}, in {seconds:.2f} s -> {args.out}")
    return 0
