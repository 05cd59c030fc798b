"""`npgpt prepare`: text files or a built-in corpus -> a data folder for `npgpt train`.

A thin wrapper over `npgpt.data.prepare`; every check and message lives there.
"""

from __future__ import annotations

import sys
import time

import click

from npgpt.cli import job


def _progress_printer():
    """Progress on stderr for a terminal (a line rewritten in place); nothing when piped."""
    if not sys.stderr.isatty():
        return None
    last = {"stage": None, "pct": -1}
    labels = {"count": "reading text", "merge": "learning merges", "encode": "encoding"}

    def show(stage, done, total):
        pct = int(100 * done / total) if total else -1
        if stage == last["stage"] and pct == last["pct"]:
            return
        last.update(stage=stage, pct=pct)
        amount = f"{pct}%" if total else f"{done:,}"
        click.echo(f"\r{labels.get(stage, stage)}: {amount}   ", nl=False, err=True)
    return show


@click.command()
@click.option("--input", "inputs", multiple=True, type=click.Path(),
              help="Text file or folder of text files (repeatable). Folders are read recursively, sorted.")
@click.option("--dataset", type=click.Choice(["pydoc", "tinyshakespeare"]), default=None,
              help="A built-in corpus instead of --input: pydoc (offline) or tinyshakespeare (downloaded once).")
@click.option("--out", "out_dir", required=True, type=click.Path(),
              help="Folder to write train.bin, val.bin, meta.json and the tokenizer into.")
@click.option("--tokenizer", type=click.Choice(["char", "bpe"]), default=None,
              help="Tokenizer to train: char (one token per character, default) or bpe (byte-level BPE).")
@click.option("--vocab-size", type=int, default=None,
              help="BPE vocabulary size (default 4096); only with --tokenizer bpe.")
@click.option("--tokenizer-from", type=click.Path(), default=None,
              help="Reuse the tokenizer in this folder (e.g. a model's, for fine-tuning) instead of training one.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Fraction of the tokens (the end of the input) kept for validation.")
@click.option("--force", is_flag=True, help="Replace prepared data already in --out.")
@click.option("--errors", type=click.Choice(["strict", "replace"]), default="strict", show_default=True,
              help="Invalid UTF-8: stop with an error, or replace it with U+FFFD.")
def prepare(inputs, dataset, out_dir, tokenizer, vocab_size, tokenizer_from, val_fraction, force, errors):
    """Tokenize text into a data folder for `npgpt train --data DIR`."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.data import prepare as run_prepare
    from npgpt.errors import NpgptError

    if tokenizer_from and tokenizer:
        raise NpgptError("give --tokenizer or --tokenizer-from, not both (--tokenizer-from reuses a tokenizer as is)")
    progress = _progress_printer()
    start = time.perf_counter()
    meta = run_prepare(inputs=list(inputs), out_dir=out_dir, tokenizer=tokenizer, vocab_size=vocab_size,
                       tokenizer_from=tokenizer_from, val_fraction=val_fraction, dataset=dataset,
                       progress=progress, force=force, errors=errors, trust_pattern=job("trust_pattern", False))
    seconds = time.perf_counter() - start
    if progress is not None:
        click.echo("", err=True)
    sources = meta["sources"]
    total_bytes = sum(s["bytes"] for s in sources)
    click.echo(f"prepared {out_dir} in {seconds:.1f} s from {len(sources)} file(s), {total_bytes:,} bytes")
    click.echo(f"tokens: {meta['train_tokens']:,} train, {meta['val_tokens']:,} val")
    click.echo(f"tokenizer: {meta['tokenizer']}, vocab size {meta['vocab_size']:,}; token dtype {meta['dtype']}")
    if tokenizer_from:
        click.echo(f"next: npgpt finetune --init-from {tokenizer_from} --data {out_dir}")
    else:
        click.echo(f"next: npgpt train --data {out_dir}")


COMMANDS = [prepare]
