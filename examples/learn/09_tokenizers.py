"""Lesson 09: tokenizers: train a byte-level BPE and watch the merges.

    python examples/learn/09_tokenizers.py [--text FILE] [--fast]

A model reads integers. Characters (npgpt's `char` tokenizer) give a small vocabulary and long
sequences; byte-pair encoding (BPE, as GPT-2) starts from the 256 bytes and repeatedly merges the
most frequent adjacent pair into a new token:

    "the the then"  ->  chunks 'the', ' the', ' then'  (the split is explained below)
    pair counts: (t, h) 3, (h, e) 3, (' ', t) 2, (e, n) 1
    a tie at 3: npgpt takes the pair with the smaller ids, (h, e) = (104, 101) before
    (t, h) = (116, 104), so the first merge is (h, e) -> 'he';  then (t, 'he') -> 'the'
    (count 3);  then (' ', 'the') -> ' the' (count 2);  ...

The tie rule: the most frequent pair wins; among equally frequent pairs, the one whose
(left id, right id) is smallest. Any fixed rule would do (GPT-2's original trainer and Hugging
Face's break ties differently); what matters is that it is deterministic, so the same text always
trains the same tokenizer. The lesson trains on "the the then" and checks these merges.

Each merge shortens the encoded text; the vocabulary grows by one. Before counting pairs, the text
is split into chunks by a regular expression (GPT-2's pattern keeps letters, digits, punctuation
and spaces apart, and a space sticks to the word after it), so merges never cross a word
boundary: ' the' becomes one token, 'the.' does not.

Trade-off: a bigger vocabulary means fewer tokens per text (more text fits in block_size, fewer
steps per document) but a bigger embedding table and rarer tokens, each seen less often.

Read next: npgpt/tokenizer/bpe.py (training, encoding with merge ranks), npgpt/tokenizer/char.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, corpus, parse, picture, title  # noqa: E402

from npgpt.tokenizer import BPETokenizer, CharTokenizer  # noqa: E402


def show(tok, t):
    return repr(tok.token_bytes(t).decode("utf-8", errors="replace"))


def main(argv=None):
    args = parse(argv, __doc__, corpus=True)
    text, name = corpus(args.text, args.fast, min_chars=20_000, why="BPE needs text enough for 1,024 tokens' merges")
    text = text[: 30_000 if args.fast else 300_000]
    n_bytes = len(text.encode("utf-8"))
    title("the worked example: 'the the then' and the tie rule")
    tiny = BPETokenizer.train("the the then", vocab_size=260, pattern="gpt2")   # 256 bytes + 3 merges + <|endoftext|>
    first = [tiny.token_bytes(a) + b"+" + tiny.token_bytes(b) for a, b in tiny.merges]
    print("merges:", ", ".join(m.decode() for m in first))
    check(first == [b"h+e", b"t+he", b" +the"],
          "(t, h) and (h, e) tie at 3; the smaller ids (h, e) merge first, then 'the', then ' the'")

    title(f"train BPE on {n_bytes:,} bytes of {name}")
    sizes = (300, 400) if args.fast else (300, 512, 1024)
    toks = {v: BPETokenizer.train(text, vocab_size=v, pattern="gpt2") for v in sizes}
    tok = toks[sizes[-1]]
    merges = tok.merges
    print("the first 12 merges (left + right -> new token):")
    for i, (a, b) in enumerate(merges[:12]):
        new = 256 + i
        print(f"  {i + 1:2d}. {show(tok, a):>8} + {show(tok, b):<8} -> {show(tok, new)}")
    print("some late merges (whole words appear):",
          ", ".join(show(tok, 256 + i) for i in range(len(merges) - 8, len(merges))))

    title("compression: tokens per byte as the vocabulary grows")
    sample = text[:5000]
    char = CharTokenizer.train(text)
    ratios = {"char": len(char.encode(sample)) / len(sample.encode("utf-8"))}
    for v, t in toks.items():
        ratios[f"bpe {v}"] = len(t.encode(sample)) / len(sample.encode("utf-8"))
    for k, r in ratios.items():
        print(f"  {k:9s}: {r:.3f} tokens per byte ({1 / r:.2f} bytes per token)")
    vals = [ratios[f"bpe {v}"] for v in sizes]
    check(all(a > b for a, b in zip(vals, vals[1:])), "more merges -> fewer tokens per byte")
    check(vals[-1] < 0.7 * ratios["char"], "BPE needs at least 30% fewer tokens than characters")

    title("round trip and an example")
    s = "def tokenize(text):\n    return [t for t in text.split()]  # 3 naïve words"
    ids = tok.encode(s)
    print(f"{len(s)} characters -> {len(ids)} tokens:", " | ".join(show(tok, t)[1:-1] for t in ids))
    check(tok.decode(ids) == s, "decode(encode(s)) == s, even for bytes never seen in training")
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        ax.bar(list(ratios), list(ratios.values()))
        ax.set(ylabel="tokens per byte", title="BPE: more merges, fewer tokens per byte of text")
    picture(args.out, "09_tokens_per_byte.png", draw)
    return {"ratios": ratios, "first_merge": show(tok, 256)}


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
