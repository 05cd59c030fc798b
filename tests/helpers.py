"""Small shared builders for the training / CLI tests: a generated corpus and tiny configs."""

import numpy as np

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jolly vexing zebras and bright nymphs waltz by").split()


def corpus(n_words=3000, seed=0):
    """Deterministic English-ish text (no dependency on ../shared)."""
    r = np.random.default_rng(seed)
    words = r.choice(WORDS, size=n_words)
    lines = [" ".join(words[i:i + 12]) for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


TINY = ["--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=16", "--block-size", "16",
        "--batch-size", "4", "--set", "eval_iters=2", "--set", "log_interval=2", "--set", "warmup_iters=2"]
