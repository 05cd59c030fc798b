"""`npgpt merge`: fold a LoRA adapter into its base and write a plain GPT-2 folder."""

from __future__ import annotations

from pathlib import Path

import click

from npgpt.cli import job
from npgpt.errors import NpgptError


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="The base model (run folder or model folder, float or quantised).")
@click.option("--adapter", required=True, type=click.Path(), help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors).")
@click.option("--out", required=True, type=click.Path(), help="Folder for the merged GPT-2 model.")
@click.option("--force", is_flag=True, help="Overwrite a model already in --out.")
def merge(checkpoint, adapter, out, force):
    """Merge a LoRA adapter into its base: W' = W + (alpha/r) A B, saved as a plain GPT-2 folder."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.checkpoint import find_checkpoint
    from npgpt.loading import load_run
    from npgpt.lora import merge_lora

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NpgptError(f"--out {out} is a file; choose a folder")
    if (out / "config.json").exists() and not force:
        raise NpgptError(f"{out} already holds a model; pass --force to overwrite it")
    base = find_checkpoint(checkpoint)
    if out.exists() and out.resolve() in (base.resolve(), Path(adapter).resolve()):
        raise NpgptError("--out must be a new folder, not the base or the adapter folder")
    model, tok = load_run(base, adapter=adapter, trust_pattern=job("trust_pattern", False))[:2]
    n = sum(1 for _ in model.modules() if hasattr(_, "lora_A"))
    was_quantised = bool(model.quantization)
    merge_lora(model)
    model.save_pretrained(out)
    tok.save(out)
    click.echo(f"merged {n} adapted layers into {base}" + (" (dequantised to float32)" if was_quantised else "")
               + f"; wrote {out}")
    click.echo(f"try it:  npgpt sample --checkpoint {out} --prompt \"...\"")


COMMANDS = [merge]
