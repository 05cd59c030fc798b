"""Full fine-tuning against LoRA on examples/finetune_qa.py's task, after the same number of steps.

    python examples/lora_qa.py [--steps 300] [--work lora-qa-example]

The task and the base model are finetune_qa.py's: 100 facts "what is A plus B?" for digits A, B,
80 for training and 20 held out; a character-level base pretrained on plain text holding the 80
training facts. The fine-tuning records are prompt/completion pairs ("what is 3 plus 4? " ->
"3 plus 4 is 7.") rather than chat records: the chat template adds special tokens to the
vocabulary, and LoRA keeps the base's embedding frozen, so it cannot learn new tokens.

Each run fine-tunes for the same number of steps, batch size and schedule; only the trained
parameters (and, for LoRA, the learning rate, as usual for adapters) differ. Accuracy is exact
match of the greedy answer, on the 80 training facts and the 20 held-out ones, and the
multiple-choice accuracy (npgpt.tasks) of choosing the right sum among 4 candidates.
"""

import argparse
import json
import random
import time
from pathlib import Path

from npgpt.data import prepare
from npgpt.fileio import atomic_write_text
from npgpt.loading import load_run
from npgpt.generate import generate
from npgpt.sft import SFTData
from npgpt.tasks import evaluate_task
from npgpt.train import TrainConfig, train


def facts_split():
    facts = [(a, b) for a in range(10) for b in range(10)]
    random.Random(0).shuffle(facts)
    return facts[:80], facts[80:]


def exact_match(model, tok, facts):
    prompts = [tok.encode_plain(f"what is {a} plus {b}? ") for a, b in facts]
    right = 0
    for (a, b), ids in zip(facts, prompts):
        out = tok.decode(generate(model, ids, 16, temperature=0))
        right += out.startswith(f"{a} plus {b} is {a + b}.")
    return right / len(facts)


def mc_items(facts):
    items = []
    for a, b in facts:
        s = a + b
        wrong = [w for w in (s - 2, s - 1, s + 1, s + 2, s + 3) if w >= 0][:3]
        endings = [f"{w}." for w in [s] + wrong]
        order = random.Random(a * 10 + b).sample(range(4), 4)
        items.append({"ctx": f"what is {a} plus {b}? {a} plus {b} is", "endings": [endings[i] for i in order],
                      "label": order.index(0)})
    return items


def main():
    from npgpt.programs import out_dir, positive_int   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=positive_int, default=300)
    ap.add_argument("--work", default="lora-qa-example", type=out_dir)
    ap.add_argument("--rank", type=positive_int, default=8)
    ap.add_argument("--lora-lr", type=float, default=5e-3)
    ap.add_argument("--base-iters", type=positive_int, default=600, help="pretraining steps of the base (finetune_qa.py: 600)")
    ap.add_argument("--runs", default="base,full,lora-same-lr,lora", help="which of the runs to do")
    a = ap.parse_args()
    work = Path(a.work)                     # created by out_dir as it was read
    train_facts, held_out = facts_split()
    recs = [{"prompt": f"what is {x} plus {y}? ", "completion": f"{x} plus {y} is {x + y}."} for x, y in train_facts]
    atomic_write_text(work / "qa.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    text = "".join(f"what is {x} plus {y}? {x} plus {y} is {x + y}.\n" for x, y in train_facts * 30)
    atomic_write_text(work / "qa_text.txt", text)
    if not (work / "base" / "ckpt").exists():
        prepare([str(work / "qa_text.txt")], str(work / "data"), tokenizer="char", force=True)
        train(TrainConfig(data=str(work / "data"), out=str(work / "base"), force=True, max_iters=a.base_iters,
                          block_size=64, eval_interval=200, learning_rate=2e-3, quiet=True))
    state = json.loads((work / "base" / "ckpt" / "state.json").read_text())
    print(f"base: {state['iter']} pretraining steps, val loss {state['best_val_loss']:.4f}", flush=True)
    common = dict(init_from=str(work / "base"), sft=str(work / "qa.jsonl"), force=True, max_iters=a.steps,
                  eval_interval=a.steps, min_lr=1e-4, warmup_iters=10, weight_decay=0.0, batch_size=16, quiet=True)
    runs = {"base": ("base (no fine-tuning)", None),
            "full": ("full fine-tuning, lr 1e-3", dict(out=str(work / "full"), learning_rate=1e-3)),
            "lora-same-lr": (f"LoRA r={a.rank}, lr 1e-3", dict(out=str(work / "lora-1e-3"), learning_rate=1e-3,
                                                              lora_rank=a.rank)),
            "lora": (f"LoRA r={a.rank}, lr {a.lora_lr:g}", dict(out=str(work / "lora"), learning_rate=a.lora_lr,
                                                               lora_rank=a.rank))}
    rows = []
    for key in a.runs.split(","):
        name, extra = runs[key]
        t0 = time.perf_counter()
        if extra is not None:
            cfg = TrainConfig(**common, **extra)
            train(cfg, batch_source=SFTData.for_training(cfg))   # as npgpt finetune does
        model, tok = load_run(work / "base" if extra is None else extra["out"])[:2]
        trainable = sum(p.size for p in model.parameters() if p.requires_grad)   # a LoRA model: adapters only
        row = {"run": name, "trainable": trainable if extra else 0,
               "seen": exact_match(model, tok, train_facts), "held_out": exact_match(model, tok, held_out),
               "mc_seen": evaluate_task(model, tok, mc_items(train_facts))["acc"],
               "mc_held_out": evaluate_task(model, tok, mc_items(held_out))["acc"],
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| run ({a.steps} steps, batch 16) | trainable params | exact match, 80 seen | exact match, 20 held out "
          f"| 4-way choice, seen | 4-way choice, held out |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['trainable']:,} | {r['seen']:.2f} | {r['held_out']:.2f} | {r['mc_seen']:.2f} "
              f"| {r['mc_held_out']:.2f} |")


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
