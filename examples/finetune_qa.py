"""Walkthrough: teach a small GPT to answer questions with supervised fine-tuning (SFT).

    python examples/finetune_qa.py [--out qa-example]   # a few minutes on a laptop CPU (4 on 2 busy cores)

Everything it writes (data, the base model, the chat model) goes under --out.

1. Write a tiny Q&A data set ourselves: "what is A plus B?" for digits A, B, as chat records.
2. Pretrain a small character-level base model on plain text that contains the same facts
   (the model first has to learn the characters and the shape of the text).
3. Fine-tune it on the chat records: the loss counts only the assistant's answers.
4. Ask it questions through the same chat template `npgpt chat` uses.

The same from the command line:

    npgpt prepare --input qa_text.txt --out data/qa
    npgpt train --data data/qa --out out-qa-base --max-iters 600 --block-size 64
    npgpt finetune --init-from out-qa-base --sft qa.jsonl --out out-qa-chat --max-iters 300
    npgpt chat --checkpoint out-qa-chat
"""

import argparse
import json
import random
import sys
from pathlib import Path

from npgpt.data import prepare
from npgpt.fileio import atomic_write_text
from npgpt.loading import load_run
from npgpt.sft import SFTData
from npgpt.train import TrainConfig, train
from npgpt.cli.sample import ChatSession

args = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
args.add_argument("--out", default="qa-example", help="folder for everything this writes (default: qa-example)")
work = Path(args.parse_args().out)
if work.exists() and not work.is_dir():
    sys.exit(f"error: --out {work} is a file; give a folder")
try:
    work.mkdir(parents=True, exist_ok=True)
except OSError as e:
    sys.exit(f"error: cannot create --out {work} ({e.strerror}); choose another folder")

# 1. The data: 100 facts, 80 for training, 20 held out to see whether it generalises.
facts = [(a, b) for a in range(10) for b in range(10)]
random.Random(0).shuffle(facts)
train_facts, held_out = facts[:80], facts[80:]
records = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                         {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]} for a, b in train_facts]
atomic_write_text(work / "qa.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
text = "".join(f"what is {a} plus {b}? {a} plus {b} is {a + b}.\n" for a, b in train_facts * 30)
atomic_write_text(work / "qa_text.txt", text)

# 2. Pretrain a base model on the plain text.
prepare([str(work / "qa_text.txt")], str(work / "data"), tokenizer="char", force=True)
train(TrainConfig(data=str(work / "data"), out=str(work / "base"), force=True, max_iters=600,
                  block_size=64, eval_interval=200, learning_rate=2e-3))

# 3. SFT: chat records, loss only on the answers (the template's special tokens are added).
cfg = TrainConfig(init_from=str(work / "base"), sft=str(work / "qa.jsonl"), out=str(work / "chat"), force=True,
                  max_iters=300, eval_interval=100, learning_rate=1e-3, min_lr=1e-4, warmup_iters=10,
                  weight_decay=0.0, batch_size=16)
train(cfg, batch_source=SFTData.for_training(cfg))

# 4. Ask.
model, tok = load_run(work / "chat")[:2]
chat = ChatSession(model, tok, max_new_tokens=24, temperature=0)
for a, b in train_facts[:3] + held_out[:3]:
    chat.reset()
    answer = "".join(chat.reply(f"what is {a} plus {b}?"))
    tag = "seen" if (a, b) in train_facts else "held out"
    print(f"[{tag}] what is {a} plus {b}?  ->  {answer!r}  (true: {a + b})")
