"""Exercise bpe: the byte-pair-encoding merge loop, with npgpt's tie rule.

    npgpt exercise check bpe bpe.py

The text has already been split into pre-tokens (GPT-2's regular expression: ' the', 'then', ...)
and counted; you get them as byte ids:

    words = {(116, 104, 101): 1, (32, 116, 104, 101): 1, (32, 116, 104, 101, 110): 1}   # 'the', ' the', ' then'

Repeat n_merges times:
  1. count every adjacent pair (a, b) inside every word, each word weighted by its count;
  2. pick the most frequent pair; on a tie, the smallest pair (compare (a, b) as tuples);
     a pair whose merged bytes are already a token would make a duplicate: skip it, for good;
  3. give it the next new id (256, 257, ...) and replace every occurrence of a, b in every word
     by the new id, left to right (in 'aaa', the pair (a, a) merges once: [aa, a]);
  4. record (a, b).
Stop early if no pair is left.

Contract
    train_merges(words, n_merges) -> [(a, b), ...], the merges in order (ids as ints)

The check trains npgpt's BPETokenizer on a few texts and compares merge by merge; the report names
the first merge that differs. Lesson 09 works "the the then" by hand.
"""


def train_merges(words, n_merges):
    raise NotImplementedError
