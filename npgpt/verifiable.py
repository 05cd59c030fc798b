"""Tasks with checkable answers: generators of (prompt, answer) pairs and the checkers that score an
answer, for reinforcement learning on verifiable rewards (`npgpt finetune --rl TASK`, npgpt.rl) and
for the applications in examples/apps/, which train on the same pairs.

    arithmetic     "23+45=" -> "68"                    sums and differences of numbers below 100
    number-words   "three hundred forty-two =" -> "三百四十二"   English number words to Chinese numerals
                   (examples/apps/translation.py)
    summary-facts  a short story + "\\nSummary: " -> "Tom bought apples and bread on Monday."
                   (examples/apps/summarisation.py); the reward is the share of the four facts
                   (name, day, both goods) the answer states, so it is partial credit

A Task is its name, `make(seed) -> (train pairs, held-out pairs)` (the held-out pairs are never
among the training ones), `reward(answer text, true answer) -> float in [0, 1]`, and the most
tokens an answer needs. A task of your own is a Task too (`npgpt.rl.finetune_rl(cfg, task=...)`),
or only your own reward function over a built-in task's pairs (`reward_fn=`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from npgpt.errors import NpgptError


@dataclass(frozen=True)
class Task:
    """A task with checkable answers (see the module docstring)."""
    name: str
    make: Callable            # seed -> (train [(prompt, answer)], held-out [(prompt, answer)])
    reward: Callable          # (answer text, true answer) -> float in [0, 1]
    max_new_tokens: int       # enough for any true answer and its end token (character-level)
    description: str = ""


def exact_match(got, want):
    """1.0 when the answer is exactly the true one (surrounding whitespace aside), else 0.0."""
    return float(got.strip() == want.strip())


def split(items, n_test, rng):
    """Shuffle and hold out n_test items that training never sees: (train, held out)."""
    items = list(items)
    rng.shuffle(items)
    return items[n_test:], items[:n_test]


# ---- arithmetic ----------------------------------------------------------------------------------------
def arithmetic_pair(a, b, op):
    return f"{a}{op}{b}=", str(a + b if op == "+" else a - b)


def arithmetic(seed=0, n_test=200):
    """All sums a+b and differences a-b (a >= b) of numbers below 100; n_test of them held out."""
    items = [(a, b, "+") for a in range(100) for b in range(100)] + \
            [(a, b, "-") for a in range(100) for b in range(a + 1)]
    train, test = split(items, n_test, np.random.default_rng(seed))
    return [arithmetic_pair(*t) for t in train], [arithmetic_pair(*t) for t in test]


# ---- number words (the translation app) ----------------------------------------------------------------
ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ZH = "零一二三四五六七八九"


def english(n):
    """1..999 in English words: 'three hundred forty-two'."""
    h, rest = divmod(n, 100)
    words = [f"{ONES[h]} hundred"] if h else []
    if rest >= 20:
        t, o = divmod(rest, 10)
        words.append(TENS[t] + (f"-{ONES[o]}" if o else ""))
    elif rest >= 10:
        words.append(TEENS[rest - 10])
    elif rest:
        words.append(ONES[rest])
    return " ".join(words)


def chinese(n):
    """1..999 in Chinese numerals: 三百四十二, 一百零五, 十五, 一百一十."""
    h, rest = divmod(n, 100)
    t, o = divmod(rest, 10)
    s = f"{ZH[h]}百" if h else ""
    if t:
        s += ("" if (t == 1 and not h) else ZH[t]) + "十"
    elif h and o:
        s += "零"
    if o:
        s += ZH[o]
    return s


def number_words_pair(n):
    return f"{english(n)} =", chinese(n)


def number_words(seed=0, n_test=200):
    """The numbers 1..999, n_test held out (the translation app's split for the same seed)."""
    train_n, test_n = split(range(1, 1000), n_test, np.random.default_rng(seed))
    return [number_words_pair(n) for n in train_n], [number_words_pair(n) for n in test_n]


# ---- summary facts (the summarisation app) -------------------------------------------------------------
NAMES = "Tom Ann Sam Liz Max Eva Ben Amy Joe Zoe Ian Mia".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
GOODS = "apples bread milk eggs rice tea fish soap nuts jam salt cake".split()
FILLERS = ["It was sunny.", "It was raining.", "He met a friend.", "The shop was busy.",
           "He was tired.", "A dog barked."]


def story(rng):
    """One random story and its one-sentence summary: (story + "\\nSummary: ", summary)."""
    name, day = str(rng.choice(NAMES)), str(rng.choice(DAYS))
    a, b = (str(g) for g in rng.choice(GOODS, 2, replace=False))
    fill = [str(f) for f in rng.choice(FILLERS, rng.integers(1, 4), replace=False)]
    middle = [f"He bought {a}."] + fill[:len(fill) // 2 + 1] + [f"Then he bought {b}."] + fill[len(fill) // 2 + 1:]
    text = f"On {day} {name} went to the market. " + " ".join(middle) + " He went home."
    return f"{text}\nSummary: ", f"{name} bought {a} and {b} on {day}."


def facts(want):
    """The four facts of a true summary: [name, day, first good, second good]."""
    name, rest = want.split(" bought ")
    goods, day = rest[:-1].split(" on ")
    return [name, day] + goods.split(" and ")


def facts_reward(got, want):
    """The share of the summary's four facts (name, day, both goods) the answer contains."""
    return float(np.mean([f in got for f in facts(want)]))


def summary_facts(seed=0, n_train=20000, n_test=200):
    """n_train stories from `seed`, and up to n_test held-out ones that are not among them (the
    summarisation app's split for the same seed)."""
    rng = np.random.default_rng(seed)
    train = [story(rng) for _ in range(n_train)]
    seen = {p for p, _ in train}
    test = [t for t in (story(np.random.default_rng(10_000 + seed + i)) for i in range(n_test)) if t[0] not in seen]
    return train, test


TASKS = {
    "arithmetic": Task("arithmetic", arithmetic, exact_match, 6, "sums and differences of numbers below 100"),
    "number-words": Task("number-words", number_words, exact_match, 8, "English number words -> Chinese numerals"),
    "summary-facts": Task("summary-facts", summary_facts, facts_reward, 48,
                          "a story's one-sentence summary, scored by the facts it keeps"),
}


def get_task(name) -> Task:
    """The built-in task called `name` (NpgptError listing them otherwise)."""
    if name not in TASKS:
        raise NpgptError(f"unknown RL task {name!r}; choose one of {', '.join(TASKS)} (or pass your own "
                         f"npgpt.verifiable.Task to npgpt.rl.finetune_rl)")
    return TASKS[name]
