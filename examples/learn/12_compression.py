"""Lesson 12: compression: quantise, prune, trim, distil, and what each costs.

    python examples/learn/12_compression.py [--fast]

Four ways to make a trained model smaller, each measured on the same held-out text:

  quantise  store each linear weight as int8 (or int4) plus one float scale per output channel
            (or per group of rows): w ~ round(w / s) * s, s = max|w| / 127 for 8 bits and
            max|w| / 7 for 4 bits (the integers run from -qmax to qmax). The rounding error is at
            most s / 2 per weight. 8 bits: 4x fewer bytes for those weights (plus one float scale
            per output column); 4 bits in groups of 32 rows: 32 weights take 16 bytes plus a
            4-byte scale, 20 bytes instead of 128, so 6.4x. The model computes with the rounded
            weights (npgpt/quant.py).
  prune     set the smallest-magnitude weights to zero (here 50% of all linear weights, ranked
            globally). Same file size when stored densely; the saving needs sparse storage or
            sparse kernels, which npgpt does not have: pruning here shows how much the model
            tolerates, not a speed-up (npgpt/compress.py).
  trim      remove whole MLP units (the hidden units j with the smallest ||c_fc[:, j]|| *
            ||c_proj[j, :]||) or whole blocks: a genuinely smaller dense model, faster too.
  distil    train the trimmed model to match the original's softened output distribution
            (T^2 KL(teacher_T || student_T), mixed with ordinary cross-entropy; npgpt/ops/distill.py).
            Is the teacher what helps? The control: the same trimmed model trained for the same
            steps on the same batches with plain cross-entropy and no teacher. It recovers nearly
            as much (README has the full-size figures): at this scale most of the recovery is the
            extra training itself, and the teacher's soft targets add little. The lesson prints
            both; it checks only that each recovers part of the loss.

Tokens/s are measured for greedy KV-cached decoding on this machine (a shared CPU: noisy); the
quantised model rebuilds float weights on every call, so it is smaller but not faster here.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import batch, check, eval_loss, parse, picture, pretrained, title  # noqa: E402

from npgpt.compress import count_params, prune_model, sampling_speed, trim_model  # noqa: E402
from npgpt.ops.distill import mixed_loss  # noqa: E402
from npgpt.optim import AdamW  # noqa: E402
from npgpt.quant import quantize_model, save_quantized  # noqa: E402
from npgpt.tensor import no_grad  # noqa: E402


def size_on_disk(model, bits=None, group_size=None):
    d = Path(tempfile.mkdtemp())
    try:
        if bits:
            save_quantized(model, d, bits=bits, group_size=group_size)
        else:
            model.save_pretrained(d)
        return sum(f.stat().st_size for f in d.iterdir())
    finally:
        shutil.rmtree(d)


def copy_of(model):
    import copy
    return copy.deepcopy(model)


def main(argv=None):
    args = parse(argv, __doc__)
    model, tok, train_ids, val_ids, block = pretrained(args.fast)
    rows = {}

    def measure(name, m, size):
        total, nonzero = count_params(m)
        rows[name] = dict(params=total, nonzero=nonzero, bytes=size, loss=eval_loss(m, val_ids, block),
                          tok_s=sampling_speed(m, n_tokens=32, repeats=2))

    title("measuring")
    measure("float32", model, size_on_disk(model))
    for bits, group in ((8, None), (4, 32)):
        q = copy_of(model)
        size = size_on_disk(q, bits, group)
        quantize_model(q, bits=bits, group_size=group)
        measure(f"int{bits}" + (f" (group {group})" if group else ""), q, size)
    p = copy_of(model)
    prune_model(p, 0.5)
    measure("pruned 50%", p, size_on_disk(p))
    t = trim_model(model, mlp_keep=0.25)
    measure("trimmed: MLP 25% kept", t, size_on_disk(t))

    steps = 30 if args.fast else 200
    control = copy_of(t)                          # the same trimmed weights, trained without a teacher

    def recover(student, use_teacher):
        opt = AdamW(student.named_parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
        rng = np.random.default_rng(3)            # the same batches for both
        student.train()
        for _ in range(steps):
            x, y = batch(train_ids, 16, block, rng)
            logits, ce = student(x, y)
            if use_teacher:
                with no_grad():
                    teacher_logits, _ = model(x)
                loss = mixed_loss(logits, teacher_logits, y, alpha=0.5, temperature=2.0)
            else:
                loss = ce
            opt.zero_grad()
            loss.backward()
            opt.clip_grad_norm(1.0)
            opt.step()
        student.eval()
    recover(t, True)
    measure(f"trimmed + {steps} distillation steps", t, size_on_disk(t))
    recover(control, False)
    measure(f"trimmed + {steps} cross-entropy steps (control)", control, size_on_disk(control))

    title("size / loss / speed")
    base = rows["float32"]
    print(f"{'model':46s} {'params':>8s} {'non-zero':>9s} {'bytes':>9s} {'x smaller':>9s} {'val loss':>9s} {'tok/s':>7s}")
    for name, r in rows.items():
        print(f"{name:46s} {r['params']:8,d} {r['nonzero']:9,d} {r['bytes']:9,d} {base['bytes'] / r['bytes']:9.2f} "
              f"{r['loss']:9.3f} {r['tok_s']:7.0f}")
    check(abs(rows["int8"]["loss"] - base["loss"]) < 0.02, "int8 costs under 0.02 nats of loss")
    check(rows["int8"]["bytes"] < 0.75 * base["bytes"], "int8 files are at least 25% smaller (embeddings stay float32)")
    check(rows["pruned 50%"]["nonzero"] < 0.75 * base["nonzero"], "pruning zeroes half of the linear weights")
    trimmed, distilled = rows["trimmed: MLP 25% kept"], rows[f"trimmed + {steps} distillation steps"]
    plain = rows[f"trimmed + {steps} cross-entropy steps (control)"]
    check(trimmed["params"] < base["params"], "trimming makes a smaller dense model")
    lost = trimmed["loss"] - base["loss"]
    got_d, got_c = (trimmed["loss"] - distilled["loss"]) / lost, (trimmed["loss"] - plain["loss"]) / lost
    print(f"of the {lost:.3f} nats trimming lost, distillation recovered {got_d:.0%}, plain cross-entropy "
          f"{got_c:.0%} (the control recovers {got_c / got_d:.0%} as much as distillation)")
    check(distilled["loss"] < trimmed["loss"] and plain["loss"] < trimmed["loss"],
          "more training recovers part of what trimming lost, with the teacher and without")
    recovered = {"distillation": got_d, "cross-entropy": got_c}

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        kb = [r["bytes"] / 1e3 for r in rows.values()]
        ax.scatter(kb, [r["loss"] for r in rows.values()])
        for n, x in zip(rows, kb):
            ax.annotate(n, (x, rows[n]["loss"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="kilobytes on disk", ylabel="held-out loss (nats)", title="compression: size against loss")
    picture(args.out, "12_size_vs_loss.png", draw)
    rows["recovered"] = recovered
    return rows


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
