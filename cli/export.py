"""`npgpt export --gguf`: a model and its tokenizer as one GGUF file for llama.cpp, ollama, LM Studio;
`npgpt export --hf DIR`: a folder transformers loads (GPT2LMHeadModel / LlamaForCausalLM)."""

from __future__ import annotations

from pathlib import Path

import click

from npgpt.cli import job
from npgpt.errors import NpgptError


def keep_quantized_option(fn):
    """--keep-quantized, for the commands that load a model to run it."""
    return click.option("--keep-quantized", is_flag=True,
                        help="A .gguf file: keep Q8_0 / Q4_0 / Q4_1 weights (and a Q8_0 tied embedding) quantised "
                             "in memory instead of dequantising them to float32 (about a fifth of the memory).")(fn)


def allow_other_base_option(fn):
    """--allow-other-base, for the commands that apply a LoRA adapter (npgpt.lora's fingerprint check)."""
    return click.option("--allow-other-base", is_flag=True,
                        help="Apply the adapter even if it records a different base model (fingerprint) than --checkpoint.")(fn)


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(),
              help="Run folder, model folder or .gguf file to export.")
@click.option("--gguf", "out", default=None, type=click.Path(), help="The GGUF file to write.")
@click.option("--hf", "hf_dir", default=None, type=click.Path(),
              help="Instead: a new folder in Hugging Face transformers' format (weights, config, tokenizer).")
@click.option("--type", "type_name", type=click.Choice(["f32", "f16", "q8_0"]), default="f16", show_default=True,
              help="Storage of the 2-D weights (norms and biases stay f32).")
@click.option("--adapter", type=click.Path(), default=None, help="Merge this LoRA adapter folder in first.")
@click.option("--force", is_flag=True, help="Overwrite --gguf if it exists.")
@allow_other_base_option
def export(checkpoint, out, hf_dir, type_name, adapter, force, allow_other_base):
    """Write a GPT-2 or Llama-family model with its tokenizer and chat template to a GGUF file
    (--gguf), or as a transformers folder (--hf). A model with npgpt's recipe switches (rope,
    qk_norm, relu2, soft-capping) is refused: neither format can hold it."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.loading import load_run
    from npgpt.gguf_models import export_gguf
    from npgpt.lora import merge_lora

    if (out is None) == (hf_dir is None):
        raise NpgptError("give exactly one of --gguf FILE.gguf and --hf DIR")
    if hf_dir is not None:
        return _export_hf(checkpoint, Path(hf_dir), adapter, force, allow_other_base)
    out = Path(out)
    if not out.name.lower().endswith(".gguf"):
        raise NpgptError(f"--gguf {out}: the file name must end in .gguf")
    if out.is_dir():
        raise NpgptError(f"--gguf {out} is a folder; give a file name ending in .gguf")
    if out.exists() and not force:
        raise NpgptError(f"{out} exists; pass --force to overwrite it")
    if out.exists() and out.resolve() == Path(checkpoint).resolve():
        raise NpgptError("--gguf must differ from --checkpoint")
    model, tok = load_run(checkpoint, adapter=adapter, trust_pattern=job("trust_pattern", False),
                          allow_other_base=allow_other_base)[:2]
    if adapter or getattr(model, "lora", None) or getattr(model, "quantization", None):
        merge_lora(model)          # adapters folded in, quantised layers back to float: GGUF gets plain weights
    export_gguf(model, tok, out, type_name)
    size = out.stat().st_size
    click.echo(f"wrote {out} ({size / 1e6:.1f} MB, {type_name}); try it:  npgpt sample --checkpoint {out}")


def _export_hf(checkpoint, folder, adapter, force, allow_other_base=False):
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.loading import load_run
    from npgpt.lora import merge_lora
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not force:
        raise NpgptError(f"{folder} exists and is not an empty folder; pass --force to write into it")
    if folder.exists() and folder.resolve() == Path(checkpoint).resolve():
        raise NpgptError("--hf must differ from --checkpoint")
    model, tok = load_run(checkpoint, adapter=adapter, trust_pattern=job("trust_pattern", False),
                          allow_other_base=allow_other_base)[:2]
    if adapter:
        merge_lora(model)
    if hasattr(model.config, "check_exportable"):
        model.config.check_exportable("transformers")
    model.save_pretrained(folder)
    tok.save(folder)
    click.echo(f"wrote {folder}; load it with transformers' AutoModelForCausalLM.from_pretrained({str(folder)!r})")


COMMANDS = [export]
