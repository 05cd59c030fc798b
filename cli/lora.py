"""`npgpt merge`: fold a LoRA adapter into its base and write a plain GPT-2 folder."""

from __future__ import annotations

from pathlib import Path

import click

from npgpt.cli import job
from npgpt.errors import NpgptError


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(),
              help="The base model (run folder or model folder, float or quantised), or a LoRA run folder (its recorded base and adapter).")
@click.option("--adapter", type=click.Path(), default=None,
              help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors); not needed when --checkpoint is a LoRA run.")
@click.option("--out", required=True, type=click.Path(), help="Folder for the merged GPT-2 model.")
@click.option("--force", is_flag=True, help="Overwrite a model already in --out.")
@click.option("--allow-other-base", is_flag=True,
              help="Merge even if the adapter records a different base (fingerprint) than --checkpoint.")
def merge(checkpoint, adapter, out, force, allow_other_base):
    """Merge a LoRA adapter into its base: W' = W + (alpha/r) A B, saved as a plain GPT-2 folder."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.checkpoint import find_checkpoint
    from npgpt.loading import is_lora_run, load_run
    from npgpt.lora import merge_lora

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NpgptError(f"--out {out} is a file; choose a folder")
    if (out / "config.json").exists() and not force:
        raise NpgptError(f"{out} already holds a model; pass --force to overwrite it")
    base = find_checkpoint(checkpoint)
    if adapter is None and not is_lora_run(base, None):
        raise NpgptError(f"{base} is not a LoRA run; give the adapter to merge with --adapter FOLDER")
    given = [base] + ([find_checkpoint(adapter)] if adapter and Path(adapter).is_dir() else [])
    if out.exists() and out.resolve() in {p.resolve() for p in given}:
        raise NpgptError("--out must be a new folder, not the base or the adapter folder")
    model, tok = load_run(base, adapter=adapter, trust_pattern=job("trust_pattern", False),
                          allow_other_base=allow_other_base)[:2]
    n = sum(1 for _ in model.modules() if hasattr(_, "lora_A"))
    if not n:
        raise NpgptError(f"{base} has no LoRA adapter to merge")
    was_quantised = bool(model.quantization)
    source = model.lora_base or base
    merge_lora(model)
    model.save_pretrained(out)
    tok.save(out)
    click.echo(f"merged {n} adapted layers into {source}" + (" (dequantised to float32)" if was_quantised else "")
               + f"; wrote {out}")
    click.echo(f"try it:  npgpt sample --checkpoint {out} --prompt \"...\"")


COMMANDS = [merge]
