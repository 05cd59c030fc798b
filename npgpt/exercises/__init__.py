"""Exercises with hidden answers: write the backward (or the update, or the loop) yourself, and get
told which entry is wrong.

    npgpt exercise list                      # the exercises, in a sensible order
    npgpt exercise start gelu my_work/       # copies the stub to my_work/gelu.py
    npgpt exercise check gelu my_work/gelu.py

From Python: `npgpt.exercises.start("gelu", "my_work")` and `print(npgpt.exercises.check("gelu",
"my_work/gelu.py"))`. A stub states the contract (shapes, what to return) and the maths to derive,
and leaves the body to you. The check runs your file against the library's own implementation (the
fused op, the optimizer, the trainer, the sampler) on random inputs in float64: the forward, every
gradient against the one npgpt's autograd computes for a random upstream gradient, and npgpt's
`gradcheck` of your backward against finite differences of your own forward. The answers are not
in the stubs; they are in the library (`npgpt/ops/nn.py`, `npgpt/optim.py`, ...), to read when you
choose to.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npgpt.errors import NpgptError
from npgpt.exercises.grading import NotWritten, Report, call, compare, grade_function, load_solution
from npgpt.fileio import atomic_write_bytes
from npgpt.ops import nn as F

STUBS = Path(__file__).resolve().parent / "stubs"


@dataclass(frozen=True)
class Exercise:
    name: str
    title: str
    functions: tuple          # the names the learner's file must define
    grade: object             # grade(module, report) -> report


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---- backward passes: forward(...) -> (out, cache), backward(dout, cache) -> gradients -----------
def _tanh(m, report):
    x = _rng(1).standard_normal((3, 5)) * 1.5
    return grade_function(report, m, [x], ["dx"], lambda t: t.tanh())


def _gelu(m, report):
    x = _rng(2).standard_normal((4, 6)) * 2
    return grade_function(report, m, [x], ["dx"], F.gelu)


def _layernorm(m, report):
    r = _rng(3)
    x, w, b = r.standard_normal((2, 3, 8)) * 2 + 1, r.standard_normal(8), r.standard_normal(8)
    return grade_function(report, m, [x, w, b], ["dx", "dw", "db"], lambda x, w, b: F.layer_norm(x, w, b, eps=1e-5))


def _rmsnorm(m, report):
    from npgpt.ops.llama import rms_norm           # the reference: the Llama family's fused RMSNorm
    r = _rng(4)
    x, w = r.standard_normal((2, 3, 8)) * 2 + 0.5, r.standard_normal(8)
    return grade_function(report, m, [x, w], ["dx", "dw"], lambda x, w: rms_norm(x, w, eps=1e-6))


def _softmax_ce(m, report):
    r = _rng(5)
    logits, targets = r.standard_normal((6, 7)) * 2, r.integers(0, 7, 6)
    targets[1] = -1                                      # an ignored position (a prompt, padding)
    return grade_function(report, m, [logits, targets], ["dlogits"], lambda z, t: F.cross_entropy(z, t.data))


def _attention(m, report):
    qkv = _rng(6).standard_normal((2, 5, 3 * 8))          # B = 2, T = 5, C = 8, two heads of 4
    return grade_function(report, m, [qkv], ["dqkv"], lambda t: F.causal_self_attention(t, 2), {"n_head": 2})


def _embedding_tied(m, report):
    r = _rng(7)
    wte = r.standard_normal((6, 4))                       # V = 6, C = 4
    ids = np.array([[0, 3, 3, 5], [2, 0, 3, 1]])          # token 3 three times: its gradients add
    return grade_function(report, m, [ids, wte], ["dwte"],
                          lambda ids, w: F.linear(F.embedding(w, ids.data), w.T))


# ---- optimizer steps: the learner's update against npgpt.optim's ---------------------------------
def _adamw(m, report):
    from npgpt.optim import adamw_update    # the reference: npgpt's one AdamW formula (AdamW and ZeRO call it)
    r = _rng(8)
    p0, m0, v0 = r.standard_normal((4, 3)), r.standard_normal((4, 3)) * 0.1, r.random((4, 3)) * 0.01
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    for t, g in ((1, r.standard_normal((4, 3))), (7, r.standard_normal((4, 3)))):
        flat = adamw_update(p0.copy().ravel(), g.ravel().copy(), m0.copy().ravel(), v0.copy().ravel(), p0.size,
                            step=t, **hp)
        want = tuple(a.reshape(p0.shape) for a in flat)
        try:
            got = call(m.adamw_step, p0.copy(), g.copy(), m0.copy(), v0.copy(), t, **hp)
        except NotWritten as e:
            report.add(False, str(e), "not written yet (it raises NotImplementedError)")
            return report
        except NpgptError as e:
            report.add(False, "your code raised an error", str(e))
            return report
        if not (isinstance(got, tuple) and len(got) == 3):
            report.add(False, f"step {t}", "adamw_step must return (p, m, v)")
            continue
        for label, a, b in zip(("p", "m", "v"), got, want):
            compare(report, f"step t = {t}: new {label}", a, b, rtol=1e-9, atol=1e-12)
    return report


def _newton_schulz_and_muon(m, report):
    from npgpt.optim import muon_update, newton_schulz   # the reference: npgpt's Muon
    r = _rng(9)
    try:
        for shape in ((4, 6), (6, 4)):
            G = r.standard_normal(shape)
            compare(report, f"newton_schulz on a {shape[0]}x{shape[1]} matrix", call(m.newton_schulz, G.copy(), 5),
                    newton_schulz(G, 5), rtol=1e-9, atol=1e-12)
        for shape in ((4, 6), (6, 4)):
            p, g, buf = r.standard_normal(shape), r.standard_normal(shape), r.standard_normal(shape) * 0.1
            want_p, want_buf = p.copy(), buf.copy()
            muon_update(want_p, g, want_buf, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5)
            got = call(m.muon_step, p.copy(), g.copy(), buf.copy(), lr=0.02, momentum=0.95, ns_steps=5)
            if not (isinstance(got, tuple) and len(got) == 2):
                report.add(False, f"muon_step on {shape}", "muon_step must return (p, buf)")
                continue
            compare(report, f"muon_step on a {shape[0]}x{shape[1]} weight: new buf", got[1], want_buf, rtol=1e-9,
                    atol=1e-12)
            compare(report, f"muon_step on a {shape[0]}x{shape[1]} weight: new p", got[0], want_p, rtol=1e-9,
                    atol=1e-12)
    except NotWritten as e:
        report.add(False, str(e), "not written yet (it raises NotImplementedError)")
    except NpgptError as e:
        report.add(False, "your code raised an error", str(e))
    return report


# ---- the BPE merge loop ------------------------------------------------------------------------
BPE_TEXTS = ("the the then",
             "low lower lowest newer newest wider widest",
             "a banana, a bandana and an ananas: banana bandana ananas, abracadabra")


def words_of(text):
    """The stub's input: {pre-token as a tuple of byte ids: count}, split by GPT-2's pattern."""
    import regex                                   # a dependency of npgpt; only the BPE exercise needs it here
    from npgpt.tokenizer.bpe import GPT2_PATTERN
    return {tuple(w.encode("utf-8")): c for w, c in Counter(regex.findall(GPT2_PATTERN, text)).items()}


def _bpe(m, report):
    from npgpt.tokenizer import BPETokenizer        # the reference: npgpt's own trainer
    for text in BPE_TEXTS:
        n = 12
        with warnings.catch_warnings():            # "the corpus only supports k merges": expected here
            warnings.simplefilter("ignore")
            ref = BPETokenizer.train(text, vocab_size=256 + n + 1, pattern="gpt2")
        want = [tuple(int(i) for i in pair) for pair in ref.merges]
        try:
            got = call(m.train_merges, words_of(text), len(want))
        except NotWritten as e:
            report.add(False, str(e), "not written yet (it raises NotImplementedError)")
            return report
        except NpgptError as e:
            report.add(False, "your code raised an error", str(e))
            return report
        got = [tuple(int(i) for i in pair) for pair in got] if isinstance(got, (list, tuple)) else got
        label = f"merges of {text[:24]!r}" + ("..." if len(text) > 24 else "")
        if got == want:
            report.add(True, label, f"all {len(want)} merges match")
            continue
        if not isinstance(got, list) or len(got) != len(want):
            n_got = len(got) if isinstance(got, list) else type(got).__name__
            report.add(False, label, f"returned {n_got} merges, expected a list of {len(want)} (a, b) pairs")
            continue
        k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)

        def show(pair, known=ref):
            try:
                return repr((known.token_bytes(pair[0]) + known.token_bytes(pair[1])).decode("utf-8", "replace"))
            except Exception:                      # ids the reference does not know yet
                return "?"
        report.add(False, label, f"merge {k + 1} is {got[k]} ({show(got[k])}), expected {want[k]} ({show(want[k])}); "
                                 f"the {k} merges before it match")
    return report


# ---- top-p sampling ------------------------------------------------------------------------------
def _top_p(m, report):
    from npgpt.sampling import sampling_probs       # the reference: npgpt's sampler
    r = _rng(10)
    logits = r.standard_normal((4, 10)) * 2
    logits[3] = [8, 0, 0, 0, 0, 0, 0, 0, 0, -1]        # a confident row: only one token survives
    try:
        for p, temperature in ((0.9, 1.0), (0.5, 1.0), (0.75, 0.7)):
            want = sampling_probs(logits, temperature=temperature, top_p=p)
            got = call(m.top_p_probs, logits.copy(), p, temperature)
            compare(report, f"top_p_probs(p={p}, temperature={temperature})", got, want, rtol=1e-9, atol=1e-12)
    except NotWritten as e:
        report.add(False, str(e), "not written yet (it raises NotImplementedError)")
    except NpgptError as e:
        report.add(False, "your code raised an error", str(e))
    return report


EXERCISES = {e.name: e for e in [
    Exercise("tanh", "tanh: forward and backward", ("forward", "backward"), _tanh),
    Exercise("gelu", "GELU (GPT-2's tanh form): forward and backward", ("forward", "backward"), _gelu),
    Exercise("softmax_cross_entropy", "softmax + cross-entropy, fused: dlogits = (p - onehot) / N",
             ("forward", "backward"), _softmax_ce),
    Exercise("layernorm", "LayerNorm: forward and backward (dx, dw, db)", ("forward", "backward"), _layernorm),
    Exercise("rmsnorm", "RMSNorm (Llama): forward and backward (dx, dw)", ("forward", "backward"), _rmsnorm),
    Exercise("attention", "causal multi-head self-attention: backward to the fused qkv",
             ("forward", "backward"), _attention),
    Exercise("embedding_tied", "an embedding tied to the output head: the two gradients add",
             ("forward", "backward"), _embedding_tied),
    Exercise("adamw", "one AdamW step (bias correction, decoupled weight decay)", ("adamw_step",), _adamw),
    Exercise("muon", "one Muon step: momentum, Newton-Schulz orthogonalisation, the shape scale",
             ("newton_schulz", "muon_step"), _newton_schulz_and_muon),
    Exercise("bpe", "the BPE merge loop (npgpt's tie rule)", ("train_merges",), _bpe),
    Exercise("top_p", "top-p (nucleus) sampling's distribution", ("top_p_probs",), _top_p),
]}


def names():
    """The exercise names, in the suggested order."""
    return list(EXERCISES)


def _get(name):
    if name not in EXERCISES:
        raise NpgptError(f"no exercise named {name!r}; the exercises are: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def stub_text(name) -> str:
    """The stub file of an exercise (what `start` copies out)."""
    return (STUBS / f"{_get(name).name}.py").read_text(encoding="utf-8")


def start(name, folder, overwrite=False) -> Path:
    """Copy exercise `name`'s stub to FOLDER/NAME.py and return the path. An existing file (your
    work) is never overwritten unless `overwrite`."""
    text = stub_text(name)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NpgptError(f"{folder} is a file; give a folder to put {name}.py in")
    path = folder / f"{name}.py"
    if path.exists() and not overwrite:
        raise NpgptError(f"{path} already exists (your work?); check it with `npgpt exercise check {name} {path}`, "
                         f"or pass --force to start over")
    atomic_write_bytes(path, text.encode("utf-8"))       # creates the folder (one line if it cannot)
    return path


def check(name, path) -> Report:
    """Grade the learner's file for exercise `name`; returns a Report (truthy when all checks pass).
    A file that does not import or lacks a function raises NpgptError with one line."""
    ex = _get(name)
    module = load_solution(path, ex.functions)
    with np.errstate(all="ignore"):                # the learner's overflow shows up as a wrong entry
        return ex.grade(module, Report(name))


__all__ = ["EXERCISES", "Exercise", "Report", "check", "names", "start", "stub_text"]
