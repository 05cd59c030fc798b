"""`npgpt train`, `npgpt finetune`, `npgpt eval`, `npgpt info`: thin wrappers over npgpt.train."""

from __future__ import annotations

import json
import sys

import click

from npgpt.cli import job
from npgpt.cli.export import allow_other_base_option, keep_quantized_option

# Direct flags for the common config keys: (flag, config key, type, help).
COMMON_FLAGS = [
    ("--data", "data", click.Path(), "Prepared data folder (from `npgpt prepare`). Default: built-in pydoc corpus."),
    ("--out", "out", click.Path(), "Run folder for the checkpoint and metrics.jsonl."),
    ("--device", "device", str, "cpu, gpu, cuda or cuda:N (default: $NPGPT_DEVICE or cpu)."),
    ("--preset", "preset", str, "Model shape: baby, shakespeare-char, gpt2, gpt2-medium, gpt2-large, gpt2-xl; llama-baby, llama-shakespeare-char (or --set arch=llama); modern-baby, modern-shakespeare (the modern recipe, trained with Muon; llama-modern-baby, llama-modern-shakespeare: their Llamas)."),
    ("--max-iters", "max_iters", int, "Number of optimizer steps."),
    ("--batch-size", "batch_size", int, "Sequences per micro-batch."),
    ("--block-size", "block_size", int, "Context length in tokens."),
    ("--lr", "learning_rate", float, "Peak learning rate."),
    ("--eval-interval", "eval_interval", int, "Evaluate (and checkpoint) every N steps."),
    ("--seed", "seed", int, "Random seed (weights, batches, dropout)."),
    ("--precision", "precision", click.Choice(["fp32", "tf32", "fp16"]),
     "Matmul precision: fp32, tf32 (GPU) or fp16 (fp32 master weights, dynamic loss scaling)."),
    ("--init-from", "init_from", click.Path(), "Start from a model folder (npgpt checkpoint or HF GPT-2)."),
]


def training_options(fn):
    for flag, key, typ, help_ in reversed(COMMON_FLAGS):
        fn = click.option(flag, key, type=typ, default=None, help=help_)(fn)
    fn = click.option("--config", "config_file", type=click.Path(), help="JSON or TOML file of config keys.")(fn)
    fn = click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE",
                      help="Set any config key (repeatable), e.g. --set dropout=0.1.")(fn)
    fn = click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")(fn)
    fn = click.option("--force", is_flag=True, help="Overwrite a checkpoint already in --out.")(fn)
    fn = click.option("--quiet", "-q", is_flag=True, help="Print only errors and the final summary.")(fn)
    return fn


def build_config(defaults: dict, config_file, set_pairs, flags: dict, resume, force, quiet):
    """Config = dataclass defaults < command defaults < --config file < --set < direct flags.

    With --resume the base is the saved run's config instead, and only what the user gave applies.
    """
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.train import config_for_resume
    from npgpt.training.config import (TrainConfig, apply_overrides, load_config_file, parse_set_options,
                                       preset_defaults)
    user = {}
    if config_file:
        user.update(load_config_file(config_file))
    user.update(parse_set_options(set_pairs))
    user.update({k: v for k, v in flags.items() if v is not None})
    if quiet:
        user["quiet"] = True
    if resume:
        out = user.pop("out", defaults.get("out", TrainConfig.out))
        return config_for_resume(out, user)
    if force:
        user["force"] = True
    preset = user.get("preset", defaults.get("preset", TrainConfig.preset))
    return apply_overrides(TrainConfig(), {**defaults, **preset_defaults(preset), **user}).validate()


NEXT_STEP = "npgpt sample --checkpoint {out}   # add --prompt TEXT to start from your own text"


def run_training(cfg, batch_source=None, next_step=NEXT_STEP):
    """Run npgpt.train.train; Ctrl-C (checkpoint saved) exits 130; finish with a summary and a hint."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.train import train
    # mpiexec: the job's communicator; `npgpt --trust-pattern`: the tokenizers' opt-in
    _finish(lambda: train(cfg, batch_source=batch_source, comm=job("comm"), trust_pattern=job("trust_pattern", False)),
            next_step)


def _finish(run, next_step):
    """run() -> TrainResult; Ctrl-C (checkpoint saved) exits 130; a summary and a hint."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.train import Interrupted
    try:
        result = run()
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(130)
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss != float("inf") else "n/a"
    click.echo(f"done: {result.iters} iterations, best val loss {best}; checkpoint in {result.out / 'ckpt'}")
    click.echo("try it:  " + next_step.format(out=result.out))


@click.command()
@training_options
def train(config_file, set_pairs, resume, force, quiet, **flags):
    """Train a GPT from scratch (or continue one with --resume).

    With no arguments: prepares the built-in pydoc corpus char-level, trains a small model for a
    few minutes on the CPU, saves it in ./out and prints the command to sample from it.
    """
    cfg = build_config({}, config_file, set_pairs, flags, resume, force, quiet)
    run_training(cfg)


FINETUNE_DEFAULTS = {"learning_rate": 1e-4, "min_lr": 1e-5, "warmup_iters": 10, "max_iters": 200,
                     "eval_interval": 50, "eval_iters": 10, "weight_decay": 0.0, "out": "out-finetune"}


@click.command()
@training_options
@click.option("--sft", type=click.Path(), help="JSONL of {prompt, completion} or {messages: [...]} records.")
@click.option("--strict", is_flag=True, help="With --sft or --dpo: error on records longer than block_size (default: truncate).")
@click.option("--teacher", type=click.Path(), default=None, help="Distil from this model folder (same tokenizer).")
@click.option("--distill-alpha", type=float, default=None, help="Weight of the teacher's loss, in [0, 1] (default 0.5).")
@click.option("--distill-temperature", type=float, default=None, help="Softening temperature T > 0 (default 2.0).")
@click.option("--lora-rank", "lora_rank", type=int, default=None,
              help="Train LoRA adapters of rank R only (base frozen; saved in PEFT's format). --init-from may be int8.")
@click.option("--lora-alpha", "lora_alpha", type=float, default=None, help="LoRA scale alpha (update x alpha/R); default 2R.")
@click.option("--lora-dropout", "lora_dropout", type=float, default=None, help="Dropout on the adapters' input (default 0).")
@click.option("--keep-quantized", "keep_quantized", is_flag=True, default=None,
              help="--init-from a .gguf file: keep its Q8_0 / Q4_0 / Q4_1 weights quantised (train LoRA adapters on them).")
@click.option("--lora-targets", "lora_targets", default=None,
              help="Comma-separated layers to adapt (PEFT's suffix rule): default every linear layer (GPT-2: c_attn,c_proj,c_fc; Llama: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).")
@click.option("--dpo", type=click.Path(), default=None,
              help="Preference tuning (DPO) on a JSONL of {prompt, chosen, rejected} records (strings or TRL's chat form).")
@click.option("--dpo-beta", "dpo_beta", type=float, default=None, help="With --dpo: beta, the pull towards the reference (default 0.1).")
@click.option("--dpo-loss", "dpo_loss", type=click.Choice(["sigmoid", "ipo"]), default=None,
              help="With --dpo: sigmoid (DPO, default) or ipo.")
@click.option("--label-smoothing", "dpo_label_smoothing", type=float, default=None,
              help="With --dpo: conservative DPO, each label wrong with this probability in [0, 0.5) (default 0).")
@click.option("--rl", type=str, default=None,
              help="Reinforcement learning on a task with checkable answers: arithmetic, number-words, summary-facts.")
@click.option("--group-size", "rl_group_size", type=int, default=None, help="With --rl: answers sampled per prompt (default 8).")
@click.option("--kl", "rl_kl", type=float, default=None, help="With --rl: weight of the KL penalty to the reference (default 0.04).")
def finetune(config_file, set_pairs, resume, force, quiet, sft, strict, dpo, rl, **flags):
    """Fine-tune a pretrained model (--init-from DIR) on prepared data, SFT records (--sft), preference
    pairs (--dpo) or a task with checkable answers (--rl).

    Defaults: lr 1e-4 decaying to 1e-5, 200 steps, no weight decay, out ./out-finetune
    (--dpo: 8 pairs per micro-batch; --rl: 4 prompts per micro-batch).
    """
    if not flags.get("init_from") and not resume:
        raise click.UsageError("finetune needs --init-from DIR (an npgpt checkpoint or a GPT-2 folder)")
    if sum(bool(k) for k in (sft, dpo, rl)) > 1:
        raise click.UsageError("--sft, --dpo and --rl are different fine-tunes; give one")
    defaults = dict(FINETUNE_DEFAULTS)
    if sft:
        defaults.update({"sft": sft, "sft_strict": strict})
    if dpo:
        defaults.update({"dpo": dpo, "sft_strict": strict, "batch_size": 8})
    if rl:                     # a batch is prompts x group_size answers, each eval answers greedily
        defaults.update({"rl": rl, "batch_size": 4, "eval_iters": 2})
    cfg = build_config(defaults, config_file, set_pairs, flags, resume, force, quiet)
    if cfg.dpo:
        from npgpt.dpo import finetune_dpo      # imported when the command runs, as above
        _finish(lambda: finetune_dpo(cfg, comm=job("comm")), "npgpt sample --checkpoint {out}")
    elif cfg.rl:
        from npgpt.rl import finetune_rl        # imported when the command runs, as above
        _finish(lambda: finetune_rl(cfg, comm=job("comm")), "npgpt sample --checkpoint {out}")
    elif cfg.sft:
        # imported when the command runs: `npgpt --help` does not load every command's modules
        from npgpt.sft import SFTData
        run_training(cfg, SFTData.for_training(cfg, trust_pattern=job("trust_pattern", False)), next_step="npgpt chat --checkpoint {out}")
    else:
        run_training(cfg)


@click.command(name="eval")
@click.option("--checkpoint", required=True, type=click.Path(), help="Run folder or model folder.")
@click.option("--input", "input_", type=click.Path(), help="A text file to evaluate on.")
@click.option("--data", type=click.Path(), help="A prepared data folder (its val split).")
@click.option("--split", type=click.Choice(["train", "val"]), default="val", help="Split of --data.")
@click.option("--device", default="cpu", help="cpu or gpu.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--stride", type=int, default=None, help="Sliding-window loss: a window of block_size every S tokens.")
@click.option("--task", type=click.Path(), default=None, help="Multiple-choice JSONL (ctx, endings, label) to score.")
@click.option("--out", "out_file", type=click.Path(), default=None, help="With --task: write per-item results (JSONL).")
@click.option("--adapter", type=click.Path(), default=None, help="Apply this LoRA adapter folder first.")
@allow_other_base_option
@keep_quantized_option
def eval_(checkpoint, input_, data, split, device, as_json, stride, task, out_file, adapter, allow_other_base,
          keep_quantized):
    """Loss, perplexity and bits per byte on a text file or prepared data, or accuracy on a task file."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.evaluate import evaluate
    if task is not None:
        if input_ or data or stride is not None:
            raise click.UsageError("--task scores a task file; it does not combine with --input, --data or --stride")
        from npgpt.tasks import run_task      # imported when the command runs, as above
        r = run_task(checkpoint, task, out=out_file, device=device, adapter=adapter,
                     trust_pattern=job("trust_pattern", False), allow_other_base=allow_other_base)
        if as_json:
            click.echo(json.dumps(r))
        else:
            click.echo(f"{r['task']}: {r['items']:,} items, accuracy {r['acc']:.4f} (summed log-likelihood), "
                       f"{r['acc_norm']:.4f} (length-normalised)" + (f"; per-item results in {out_file}" if out_file else ""))
        return
    if out_file:
        raise click.UsageError("--out goes with --task (per-item results)")
    r = evaluate(checkpoint, input=input_, data=data, device=device, split=split, stride=stride, adapter=adapter,
                 keep_quantized=keep_quantized, trust_pattern=job("trust_pattern", False),
                 allow_other_base=allow_other_base)
    if as_json:
        click.echo(json.dumps(r))
    else:
        click.echo(f"{r['source']}: {r['tokens']:,} tokens, loss {r['loss']:.4f}, perplexity "
                   f"{r['perplexity']:.3f}, {r['bits_per_byte']:.4f} bits per byte")


@click.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(path, as_json):
    """Describe a checkpoint: config, parameters, step, best val loss, tokenizer, file sizes."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.evaluate import info as get_info
    r = get_info(path, trust_pattern=job("trust_pattern", False))
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    c = r["config"]
    click.echo(f"checkpoint: {r['checkpoint']}")
    if "model_type" in c:                  # a Llama-family model (Hugging Face's field names)
        click.echo(f"model: {c['model_type']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads "
                   f"({c['num_key_value_heads'] or c['num_attention_heads']} key/value), hidden {c['hidden_size']}, "
                   f"MLP {c['intermediate_size']}, context {c['max_position_embeddings']}, vocab {c['vocab_size']}")
    else:
        click.echo(f"model: {c['n_layer']} layers, {c['n_head']} heads, n_embd {c['n_embd']}, context "
                   f"{c['n_positions']}, vocab {c['vocab_size']}" + (f", n_inner {c['n_inner']}" if c["n_inner"] else ""))
    click.echo(f"parameters: {r['parameters']:,}")
    if r["step"] is not None:
        best = r["best_val_loss"]
        click.echo(f"step: {r['step']}, best val loss: {best:.4f}" if best is not None else f"step: {r['step']}")
    if r["tokenizer"]:
        t = r["tokenizer"]
        click.echo(f"tokenizer: {t.get('kind')}, vocab {t.get('vocab_size')}, specials "
                   f"{list(t.get('special_tokens', {}))}" if "error" not in t else f"tokenizer: {t['error']}")
    if r.get("quantization"):
        click.echo(f"quantization: {r['quantization']}")
    if r.get("lora"):
        lo = r["lora"]
        click.echo(f"LoRA adapter: r={lo['r']}, alpha={lo['alpha']:g}, {lo['layers']} layers "
                   f"({', '.join(lo['targets']) if isinstance(lo['targets'], list) else lo['targets']}) on {lo['base']}")
    click.echo("files: " + ", ".join(f"{k} {_size(v)}" for k, v in r["files"].items()) + f" (total {_size(r['total_bytes'])})")


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


COMMANDS = [train, finetune, eval_, info]
