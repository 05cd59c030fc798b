"""Tokenizer speed check.

    python -m npgpt.tokenizer.bench FILE [--vocab-size 4096] [--pattern gpt2] [--stream]

Without --stream the file is read into memory: BPE training time, then encoding throughput of the
whole text after one warm-up pass (so the pre-token cache is filled), then a round-trip check. With
--stream, training reads the file in chunks (`train_from_file`) and encoding goes chunk by chunk
(`encode_file`), the way a corpus larger than memory is handled. Peak resident memory is printed last.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from npgpt.tokenizer.bpe import BPETokenizer
from npgpt.tokenizer.files import read_text_checked


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m npgpt.tokenizer.bench", description=__doc__.split("\n")[0])
    parser.add_argument("file", help="UTF-8 text file to train on and encode")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size to train")
    parser.add_argument("--pattern", default="gpt2", help="pre-token split pattern: gpt2 or gpt4")
    parser.add_argument("--stream", action="store_true", help="stream the file instead of reading it whole")
    args = parser.parse_args(argv)
    megabytes = os.path.getsize(args.file) / 1e6
    print(f"file: {args.file} ({megabytes:.1f} MB)")

    if args.stream:
        start = time.perf_counter()
        tok = BPETokenizer.train_from_file(args.file, args.vocab_size, pattern=args.pattern)
        print(f"train (streamed): {time.perf_counter() - start:.2f} s for {tok.vocab_size} tokens")
        start = time.perf_counter()
        n_ids = sum(len(ids) for ids in tok.encode_file(args.file, allowed_special="all"))
        seconds = time.perf_counter() - start
        print(f"encode (streamed): {megabytes / seconds:.2f} MB/s ({n_ids} ids, {seconds:.2f} s)")
    else:
        text = read_text_checked(args.file)
        start = time.perf_counter()
        tok = BPETokenizer.train(text, args.vocab_size, pattern=args.pattern)
        print(f"train: {time.perf_counter() - start:.2f} s for {tok.vocab_size} tokens")
        start = time.perf_counter()
        ids = tok.encode(text, allowed_special="all")
        print(f"encode, first pass (fills the cache): {megabytes / (time.perf_counter() - start):.2f} MB/s")
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            ids = tok.encode(text, allowed_special="all")
            best = min(best, time.perf_counter() - start)
        print(f"encode, warm: {megabytes / best:.2f} MB/s ({len(ids)} ids, "
              f"{len(text.encode('utf-8')) / len(ids):.2f} bytes per token)")
        start = time.perf_counter()
        assert tok.decode(ids) == text, "decode(encode(text)) differs from text"
        print(f"decode: {megabytes / (time.perf_counter() - start):.2f} MB/s (round trip ok)")
    print(f"peak RSS: {_peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
