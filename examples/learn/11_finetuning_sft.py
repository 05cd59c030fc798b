"""Lesson 11: fine-tuning, and supervised fine-tuning (SFT) with the loss on answers only.

    python examples/learn/11_finetuning_sft.py [--fast]

Fine-tuning is more training, starting from trained weights instead of random ones, usually on
different text and with a smaller learning rate (the weights are already good; big steps would
undo what pretraining found). The lesson pretrains a small model on the Python docs (prose), then
fine-tunes it on Python source code from the standard library (another domain, shipped with
Python), and compares it with a model trained from scratch for the same number of steps on the
same code: pretraining gives a head start (spelling, spacing, common words are shared).

SFT teaches a format: prompt -> answer. Each example is prompt + answer + <|endoftext|>, and the
targets are -1 on the prompt: cross-entropy ignores those positions (lesson 04), so the model is
graded only on what it should say, not on predicting the user's question. npgpt.sft renders
records this way (`npgpt finetune --sft data.jsonl`); chat records use special tokens
<|user|>, <|assistant|>, <|end|> around each turn and learn only the assistant's. The
applications in examples/apps/ are SFT end to end (dialogue.py uses the chat template).
"""

import sys
import sysconfig
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, eval_loss, parse, picture, pretrained, small_gpt, title, train_lm  # noqa: E402

from npgpt.ops.nn import cross_entropy  # noqa: E402
from npgpt.sft import render_chat, render_record  # noqa: E402


def stdlib_code(tok, n_chars):
    """Python source from the standard library, cut to characters the tokenizer knows."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    text = ""
    for name in ("textwrap.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py", "string.py", "glob.py"):
        f = lib / name
        if f.is_file():
            text += f.read_text(encoding="utf-8", errors="replace") + "\n"
    known = set(tok.chars)
    text = "".join(c for c in text if c in known)[:n_chars]
    return np.array(tok.encode(text), dtype=np.int64)


def main(argv=None):
    args = parse(argv, __doc__)
    model, tok, _, _, block = pretrained(args.fast)

    title("fine-tuning: from docs (prose) to standard-library code")
    code = stdlib_code(tok, 40_000 if args.fast else 150_000)
    n = int(0.9 * len(code))
    code_train, code_val = code[:n], code[n:]
    steps = 30 if args.fast else 200
    before = eval_loss(model, code_val, block)
    tuned_curve = train_lm(model, code_train, steps, block, lr=1e-3, seed=1)       # smaller lr than pretraining
    tuned = eval_loss(model, code_val, block)
    scratch = small_gpt(tok.vocab_size, args.fast, block=block, seed=7)
    scratch_curve = train_lm(scratch, code_train, steps, block, lr=3e-3, seed=1)
    from_scratch = eval_loss(scratch, code_val, block)
    print(f"held-out code loss: pretrained on docs {before:.3f} -> fine-tuned {tuned:.3f}; "
          f"trained from scratch for the same {steps} steps: {from_scratch:.3f}")
    check(tuned < before, "fine-tuning on code lowers the loss on held-out code")
    check(tuned < from_scratch, "starting from pretrained weights beats starting from random ones")

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for label, curve in (("fine-tuned from the docs model", tuned_curve), ("from random weights", scratch_curve)):
            ax.plot([s for s, _ in curve], [v for _, v in curve], label=label)
        ax.set(xlabel="step", ylabel="training loss on code (nats/char)", title="a head start: pretrained vs scratch")
        ax.legend(fontsize=7)
    picture(args.out, "11_finetune_vs_scratch.png", draw)

    title("SFT: targets are -1 on the prompt")
    ids, mask = render_record(tok, {"prompt": "Q: two and two\nA:", "completion": " four"})
    targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    print("tokens: ", [tok.decode([t]) for t in ids])
    print("targets:", [tok.decode([t]) if t >= 0 else -1 for t in targets])
    check(targets.count(-1) == len(ids) - 1 - len(" four") - 1, "only the answer ' four' and <|endoftext|> are graded")
    logits = model(np.array([ids[:-1]]))[0]
    masked = float(cross_entropy(logits, np.array([targets])).data)
    per_token = -np.log(np.exp(logits.data[0] - logits.data[0].max(-1, keepdims=True))
                        / np.exp(logits.data[0] - logits.data[0].max(-1, keepdims=True)).sum(-1, keepdims=True))
    graded = [per_token[i, t] for i, t in enumerate(targets) if t >= 0]
    print(f"masked loss {masked:.4f} = mean of the {len(graded)} graded positions' losses {np.mean(graded):.4f}")
    check(abs(masked - np.mean(graded)) < 1e-4, "the loss averages over answer positions only")

    title("a chat record in the template (special tokens added to the tokenizer)")
    ids, mask = render_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    print("".join(f"[{tok.decode([t])}]" if m else tok.decode([t]) for t, m in zip(ids, mask)),
          " <- learned tokens in [brackets]")
    check(sum(mask) == len("Hello!") + 1, "a chat record learns the assistant's words and its <|end|>")
    return {"before": before, "tuned": tuned, "scratch": from_scratch}


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
