"""Measure the memory of full fine-tuning, LoRA, and LoRA on an int8 base (README's LoRA table).

    python examples/lora_memory.py                      # shakespeare-char and gpt2 (124M) shapes
    python examples/lora_memory.py --shapes shakespeare-char --batch-size 8 --block-size 256

Models are random-initialised (memory does not depend on the values). Each case runs in a fresh
process with NPGPT_MALLOC_TUNING=0 and a fixed glibc mmap threshold, so freed arrays go back to the
OS and the resident set follows live memory. Reported per case:

    trainable      parameters the optimizer updates
    weights        bytes of the model's weights (int8 integers + float32 scales on the int8 base)
    opt state      bytes of AdamW's two moments (m, v); the flat gradient buffer is as big again
    peak train     the process's peak RSS during the training steps (the high-water mark is reset
                   once the model and optimizer are built, through /proc/self/clear_refs)
    peak total     the peak RSS of the whole process, building the model included (building an int8
                   model today makes the float model first, as loading an int8 folder does)
"""

import argparse
import json
import os
import subprocess
import sys

SHAPES = {"shakespeare-char": dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384),
          "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)}
MODES = ("full", "lora", "lora-int8")


def _status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def child(shape, mode, rank, steps, batch_size, block_size):
    import gc

    import numpy as np

    from npgpt.lora import LoRAConfig, apply_lora, trainable_parameters
    from npgpt.model import GPT, GPTConfig
    from npgpt.optim import AdamW
    from npgpt.layers import QuantizedLinear, linear_layers
    from npgpt.quant import quantize_model

    cfg = GPTConfig(**SHAPES[shape])
    model = GPT(cfg, seed=0)
    if mode == "lora-int8":
        quantize_model(model, bits=8)
        gc.collect()
    if mode != "full":
        apply_lora(model, LoRAConfig(r=rank, alpha=2 * rank))
    named = trainable_parameters(model)
    opt = AdamW(named, lr=1e-4, weight_decay=0.0)
    weights = sum(p.data.nbytes for p in model.parameters() if not p.requires_grad or mode == "full")
    weights += sum(lin.qweight.nbytes + lin.scales.nbytes + (lin.bias.data.nbytes if lin.bias is not None else 0)
                   for _, _, _, lin in linear_layers(model) for lin in [getattr(lin, "base", lin)]
                   if isinstance(lin, QuantizedLinear))
    gc.collect()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                    # reset VmHWM to the current RSS
    except OSError:
        reset = False
    rss_built = _status_kb("VmRSS")
    r = np.random.default_rng(0)
    T = block_size or cfg.block_size
    model.train()
    for _ in range(steps):
        x = r.integers(0, cfg.vocab_size, (batch_size, T))
        y = r.integers(0, cfg.vocab_size, (batch_size, T))
        opt.zero_grad()
        loss = model(x, y)[1]
        loss.backward()
        opt.clip_grad_norm(1.0)
        opt.step(1e-4)
        del loss
    import resource
    return {"shape": shape, "mode": mode, "rank": rank if mode != "full" else None,
            "batch": batch_size, "block": T, "steps": steps,
            "trainable": int(sum(p.size for _, p in named)), "weights_bytes": int(weights),
            "opt_state_bytes": int(opt.exp_avg.nbytes + opt.exp_avg_sq.nbytes),
            "grad_buffer_bytes": int(opt.grad.nbytes),
            "rss_after_build_kb": rss_built,
            "peak_train_kb": _status_kb("VmHWM") if reset else None,
            "peak_total_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _mb(n):
    return f"{n / 2**20:,.1f} MB"


def main():
    from npgpt.programs import positive_int   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="shakespeare-char,gpt2")
    ap.add_argument("--rank", type=positive_int, default=8)
    ap.add_argument("--steps", type=positive_int, default=2)
    ap.add_argument("--batch-size", type=positive_int, default=1)
    ap.add_argument("--block-size", type=positive_int, default=256)
    ap.add_argument("--json", default=None, help="also write the records to this file")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.rank, a.steps, a.batch_size, a.block_size)))
        return
    rows = []
    # every large array gets its own mapping, returned on free (glibc's threshold stays fixed)
    env = {**os.environ, "NPGPT_MALLOC_TUNING": "0", "MALLOC_MMAP_THRESHOLD_": "131072",
           "MALLOC_TRIM_THRESHOLD_": "131072"}
    for shape in a.shapes.split(","):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", shape, mode, "--rank", str(a.rank), "--steps", str(a.steps),
                   "--batch-size", str(a.batch_size), "--block-size", str(a.block_size)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            rows.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    print(f"| shape | mode | trainable params | weights | AdamW state (m, v) | peak RSS, training | peak RSS, whole run |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mode = r["mode"] if r["mode"] == "full" else f"{r['mode']} (r={r['rank']})"
        peak = _mb(r["peak_train_kb"] * 1024) if r["peak_train_kb"] else "n/a"
        print(f"| {r['shape']} | {mode} | {r['trainable']:,} | {_mb(r['weights_bytes'])} | {_mb(r['opt_state_bytes'])} "
              f"| {peak} | {_mb(r['peak_total_kb'] * 1024)} |")
    print(f"(batch {rows[0]['batch']} x {rows[0]['block']} tokens, {rows[0]['steps']} steps, random-init weights)")
    if a.json:
        from npgpt.fileio import atomic_write_json    # a link or device: npgpt.fileio's rules
        atomic_write_json(a.json, rows)


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
