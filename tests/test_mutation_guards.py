"""Tests aimed at paths a mutation spot-check found unguarded (issue 12, item 9).

Each test here was written against a small plausible bug that survived the rest of the suite: the
AdamW update past the size where the flat buffer is split into blocks, top-p on several rows and
exactly at its boundary, BPE training well beyond its first merges, a checkpoint byte changed past
the first MiB, softmax-based losses on float32 logits around +-1e3, the `always_save_checkpoint=False`
branch on a run whose eval really gets worse, `npgpt bench --set` for settings other than n_layer,
and `npgpt info`'s parameter count. Every expected value comes from an independent reference written
plainly here (float64, per row, naive recount), never from the code under test.
"""

import hashlib
import json
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import regex
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt import GPT, GPTConfig, Tensor
from npgpt.checkpoint import checkpoint_writer, find_checkpoint, sha256_file, verify_checkpoint
from npgpt.cli.main import cli
from npgpt.errors import NpgptError
from npgpt.sampling import sampling_probs
from npgpt.ops import parallel
from npgpt.ops.nn import cross_entropy
from npgpt.optim import AdamW
from npgpt.tokenizer.bpe import PATTERNS, BPETokenizer


# ---- AdamW past the blocked-update threshold ---------------------------------------------------
# The CPU update splits the flat buffers into cache-sized blocks once they hold 2 * BLOCK_ELEMS
# (262,144) values; the weight decay must then reach exactly the 2-D slice, which ends mid-block.
BIG_SHAPES = {"h.0.mlp.c_fc.weight": (517, 397), "wte.weight": (3, 5),          # decayed: 205,264
              "h.0.mlp.c_fc.bias": (100_003,), "ln_f.weight": (7,)}               # not decayed


def per_element_adamw(p0, grads, lrs, decayed, betas=(0.9, 0.95), eps=1e-8, wd=0.1):
    """AdamW on one flat float64 vector, as PyTorch's docs write it; `decayed` marks 2-D elements."""
    b1, b2 = betas
    p, m, v = p0.astype(np.float64), np.zeros(p0.size), np.zeros(p0.size)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64)
        p = np.where(decayed, p * (1 - lr * wd), p)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


@pytest.mark.parametrize("threads", ["1", "4"])   # 3 and 4 blocks; the decay edge falls inside one
def test_adamw_blocked_update_matches_per_element_reference(monkeypatch, threads):
    monkeypatch.setenv("NPGPT_THREADS", threads)
    r = np.random.default_rng(7)
    named = [(n, SimpleNamespace(data=r.standard_normal(s).astype(np.float32), grad=None))
             for n, s in BIG_SHAPES.items()]
    total = sum(int(np.prod(s)) for s in BIG_SHAPES.values())
    assert total > 2 * parallel.BLOCK_ELEMS > 0          # really on the blocked path
    # the reference sees the parameters in the optimizer's documented order: decayed ones first
    order = sorted(named, key=lambda np_: np_[1].data.ndim < 2)
    p0 = np.concatenate([p.data.reshape(-1) for _, p in order])
    decayed = np.concatenate([np.full(p.data.size, p.data.ndim >= 2) for _, p in order])
    opt = AdamW(named, lr=1e-2, weight_decay=0.1)
    assert opt.n_decay == int(decayed.sum()) and opt.n_decay % parallel.BLOCK_ELEMS != 0
    grads, lrs = [], []
    for step in range(3):
        opt.zero_grad()
        g = {n: r.standard_normal(s).astype(np.float32) for n, s in BIG_SHAPES.items()}
        for n, p in named:
            p.grad += g[n]
        grads.append(np.concatenate([g[n].reshape(-1) for n, _ in order]))
        lrs.append(1e-2 * (step + 1) / 3)
        opt.step(lrs[-1])
    ref = per_element_adamw(p0, grads, lrs, decayed)
    got = np.concatenate([p.data.reshape(-1) for _, p in order])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # and the decay is visible at this tolerance: without it every decayed element would differ
    nodecay = per_element_adamw(p0, grads, lrs, decayed, wd=0.0)
    assert (np.abs(ref - nodecay) > 1e-5)[decayed].mean() > 0.5


# ---- top-p on several rows and at its boundary ---------------------------------------------------
def reference_probs(row, temperature=1.0, top_k=None, top_p=None):
    """One row, plain Python: divide, keep the k largest, softmax, keep the most likely tokens while
    the mass before them is below top_p (ties: lower index first), renormalise."""
    z = [float(x) / temperature for x in row]
    V = len(z)
    if top_k is not None and top_k < V:
        kth = sorted(z, reverse=True)[top_k - 1]
        z = [x if x >= kth else float("-inf") for x in z]
    top = max(z)
    e = [np.exp(x - top) for x in z]
    p = [x / sum(e) for x in e]
    if top_p is not None and top_p < 1:
        keep, before = set(), 0.0
        for i in sorted(range(V), key=lambda i: (-p[i], i)):
            if before >= top_p:
                break
            keep.add(i)
            before += p[i]
        p = [x if i in keep else 0.0 for i, x in enumerate(p)]
        p = [x / sum(p) for x in p]
    return np.array(p)


def test_top_p_exactly_at_the_boundary_on_several_rows():
    # equal logits give exactly representable probabilities (1/4, 1/8) and prefix sums
    inf = np.inf
    logits = np.array([[0.0, 0.0, 0.0, 0.0, -inf, -inf, -inf, -inf],     # 4 x 1/4
                       [-inf, 5.0, -inf, 5.0, 5.0, -inf, 5.0, -inf],     # 4 x 1/4 elsewhere
                       [1.0] * 8])                                        # 8 x 1/8
    # the smallest set whose mass reaches top_p: at 0.5 that is 2 quarters or 4 eighths, not more
    p = sampling_probs(logits, 1.0, top_p=0.5)
    assert [set(np.flatnonzero(row)) for row in p] == [{0, 1}, {1, 3}, {0, 1, 2, 3}]
    np.testing.assert_array_equal(p[0, :2], [0.5, 0.5])
    p = sampling_probs(logits, 1.0, top_p=0.75)
    assert [len(np.flatnonzero(row)) for row in p] == [3, 3, 6]
    p = sampling_probs(logits, 1.0, top_p=0.5 + 1e-9)                 # just past it: one more token
    assert [len(np.flatnonzero(row)) for row in p] == [3, 3, 5]
    np.testing.assert_allclose(p.sum(axis=-1), 1.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 5), st.integers(2, 9),
       st.floats(0.05, 0.99), st.one_of(st.none(), st.integers(1, 9)), st.floats(0.3, 3.0))
def test_sampling_probs_on_a_batch_equals_each_row_alone(seed, B, V, top_p, top_k, temperature):
    logits = np.random.default_rng(seed).standard_normal((B, V)) * 3
    batch = sampling_probs(logits, temperature, top_k=top_k, top_p=top_p)
    assert batch.shape == (B, V)
    for i in range(B):
        np.testing.assert_allclose(batch[i], sampling_probs(logits[i:i + 1], temperature, top_k, top_p)[0],
                                   rtol=1e-12, atol=1e-15)
        ref = reference_probs(logits[i], temperature, top_k, top_p)
        # a prefix sum within rounding of top_p could fall either way; such draws are vanishingly rare
        np.testing.assert_allclose(batch[i], ref, rtol=1e-9, atol=1e-12)


def test_sampling_probs_on_large_float32_logits():
    logits = np.array([[1000.0, 999.0, -1000.0], [-1000.0, -1001.0, -999.0]], dtype=np.float32)
    p = sampling_probs(logits, 1.0)
    assert np.isfinite(p).all()
    e = np.exp([0.0, -1.0])
    np.testing.assert_allclose(p[0], [e[0] / e.sum(), e[1] / e.sum(), 0.0], atol=1e-12)
    np.testing.assert_allclose(p[1], reference_probs([-1000.0, -1001.0, -999.0]), rtol=1e-12)


# ---- BPE training against a naive trainer ----------------------------------------------------------
def naive_bpe_merges(text, n_merges, pattern):
    """Merges learned by recounting every pair of every pre-token after each merge.

    The most frequent pair wins, ties go to the smaller (left id, right id); a pair whose bytes are
    already a token is never merged (every token comes from one merge)."""
    words = Counter(regex.findall(PATTERNS[pattern], text))
    seqs = [(list(w.encode("utf-8")), c) for w, c in words.items()]
    table = [bytes([b]) for b in range(256)]
    merges = []
    while len(merges) < n_merges:
        counts = Counter()
        for seq, c in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] += c
        candidates = [pair for pair in counts if table[pair[0]] + table[pair[1]] not in table]
        if not candidates:
            break
        best = min(candidates, key=lambda pair: (-counts[pair], pair))
        new = len(table)
        table.append(table[best[0]] + table[best[1]])
        merges.append(best)
        for k, (seq, c) in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = (out, c)
    return merges, table


def check_against_naive(text, n_merges, pattern):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # a corpus too small for n_merges warns; fine here
        tok = BPETokenizer.train(text, 256 + n_merges + 1, pattern=pattern)
    merges, table = naive_bpe_merges(text, n_merges, pattern)
    assert tok.merges == merges
    assert [tok.token_bytes(i) for i in range(256 + len(merges))] == table


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet="ab cd\n.é", min_size=1, max_size=300), st.integers(1, 60),
       st.sampled_from(["gpt2", "gpt4"]))
def test_bpe_training_equals_naive_recount(text, n_merges, pattern):
    check_against_naive(text, n_merges, pattern)


def test_bpe_training_equals_naive_recount_for_many_merges():
    from helpers import corpus
    check_against_naive(corpus(600, seed=3) + " aaaa abab abcabc ééé", 180, "gpt2")


# ---- checkpoint files past the first MiB -----------------------------------------------------------
def test_byte_flipped_past_the_first_mib_is_detected(tmp_path):
    payload = np.random.default_rng(0).bytes(3 * (1 << 20) + 123)
    with checkpoint_writer(tmp_path) as tmp:
        (tmp / "big.bin").write_bytes(payload)
    ckpt = tmp_path / "ckpt"
    assert sha256_file(ckpt / "big.bin") == hashlib.sha256(payload).hexdigest()
    assert verify_checkpoint(ckpt)
    for offset in (1 << 20, (1 << 20) + 4567, 2 * (1 << 20) + 99, len(payload) - 1):
        damaged = bytearray(payload)
        damaged[offset] ^= 0x01
        (ckpt / "big.bin").write_bytes(bytes(damaged))
        with pytest.raises(NpgptError, match="big.bin is truncated or modified.*sha256 differs"):
            verify_checkpoint(ckpt)
    (ckpt / "big.bin").write_bytes(payload)
    assert verify_checkpoint(ckpt)


# ---- softmax-based losses on float32 logits around +-1e3 -----------------------------------------
def float64_cross_entropy(z, t, ignore_index=-1):
    z = z.astype(np.float64)
    shift = z - z.max(axis=1, keepdims=True)
    logp = shift - np.log(np.exp(shift).sum(axis=1, keepdims=True))
    valid = t != ignore_index
    n = max(int(valid.sum()), 1)
    loss = -(logp[np.arange(len(t)), np.where(valid, t, 0)] * valid).sum() / n
    grad = np.exp(logp)
    grad[np.arange(len(t)), np.where(valid, t, 0)] -= 1
    return loss, grad * valid[:, None] / n


def big_logits(seed=0):
    r = np.random.default_rng(seed)
    z = r.uniform(-1e3, 1e3, (6, 11))
    z[1] = 1e3 + r.standard_normal(11)            # all near +1e3: exp overflows without the shift
    z[2] = -1e3 + r.standard_normal(11)           # all near -1e3: exp underflows to 0 without it
    return z.astype(np.float32)


def test_cross_entropy_on_float32_logits_near_1e3():
    z = big_logits()
    t = np.array([3, 0, 10, 5, -1, 7])
    logits = Tensor(z.copy(), requires_grad=True)
    loss = cross_entropy(logits, t)
    loss.backward()
    ref_loss, ref_grad = float64_cross_entropy(z, t)
    assert np.isfinite(loss.data) and np.isfinite(logits.grad).all()
    assert loss.data.dtype == np.float32
    np.testing.assert_allclose(float(loss.data), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(logits.grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_softmax_and_log_softmax_on_float32_logits_near_1e3():
    z = big_logits(1)
    shift = z.astype(np.float64) - z.astype(np.float64).max(axis=-1, keepdims=True)
    ref_logp = shift - np.log(np.exp(shift).sum(axis=-1, keepdims=True))
    dy = np.random.default_rng(2).standard_normal(z.shape)
    for op, ref, grad_ref in [
            ("softmax", np.exp(ref_logp),
             np.exp(ref_logp) * (dy - (dy * np.exp(ref_logp)).sum(-1, keepdims=True))),
            ("log_softmax", ref_logp, dy - np.exp(ref_logp) * dy.sum(-1, keepdims=True))]:
        x = Tensor(z.copy(), requires_grad=True)
        y = getattr(x, op)(axis=-1)
        y.backward(dy.astype(np.float32))
        assert np.isfinite(y.data).all() and np.isfinite(x.grad).all(), op
        np.testing.assert_allclose(y.data, ref, rtol=1e-4, atol=1e-5 if op == "softmax" else 1e-3, err_msg=op)
        np.testing.assert_allclose(x.grad, grad_ref, rtol=1e-3, atol=1e-4, err_msg=op)


def test_distillation_loss_on_float32_logits_near_1e3():
    from npgpt.ops.distill import distill_loss
    s, t = big_logits(3), big_logits(4)
    T = 2.0

    def log_softmax64(a):
        a = a.astype(np.float64) / T
        a = a - a.max(axis=-1, keepdims=True)
        return a - np.log(np.exp(a).sum(axis=-1, keepdims=True))
    lp, lq = log_softmax64(t), log_softmax64(s)
    ref = T * T * (np.exp(lp) * (lp - lq)).sum(-1).mean()
    student = Tensor(s.copy(), requires_grad=True)
    loss = distill_loss(student, t, temperature=T)
    loss.backward()
    assert np.isfinite(loss.data) and np.isfinite(student.grad).all()
    np.testing.assert_allclose(float(loss.data), ref, rtol=1e-4)
    # d/ds of T^2 mean KL = T (q - p) / N
    np.testing.assert_allclose(student.grad, T * (np.exp(lq) - np.exp(lp)) / len(s), rtol=1e-3, atol=1e-5)


# ---- always_save_checkpoint=False on a run whose eval gets worse ----------------------------------
@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    from helpers import corpus

    from npgpt.data import prepare
    d = tmp_path_factory.mktemp("guard-data")
    (d / "corpus.txt").write_text(corpus())
    prepare([str(d / "corpus.txt")], str(d / "prep"), tokenizer="char")
    return d / "prep"


def sabotaged_data(path, good_train_batches):
    """The prepared data, except that after `good_train_batches` training batches every target is
    the last token id: training then unlearns the text and the val loss climbs."""
    from npgpt.data import TokenData

    class Sabotaged(TokenData):
        calls = 0

        def get_batch(self, split, batch_size, block_size, rng, device=None):
            x, y = super().get_batch(split, batch_size, block_size, rng, device=device)
            if split == "train":
                self.calls += 1
                if self.calls > good_train_batches:
                    y = y * 0 + (self.vocab_size - 1)
            return x, y
    return Sabotaged(path)


@pytest.mark.parametrize("always_save", [False, True])
def test_always_save_checkpoint_false_keeps_the_best_eval_not_the_last(char_data, tmp_path, always_save):
    from npgpt.train import TrainConfig, train
    cfg = TrainConfig(data=str(char_data), out=str(tmp_path / "r"), n_layer=1, n_head=2, n_embd=16, block_size=16,
                      batch_size=4, max_iters=24, eval_interval=6, eval_iters=2, log_interval=6, warmup_iters=0,
                      learning_rate=1e-2, decay_lr=False, always_save_checkpoint=always_save, quiet=True)
    result = train(cfg, batch_source=sabotaged_data(char_data, good_train_batches=12))
    evals = [(h["iter"], h["val_loss"]) for h in result.history]
    best_iter, best = min(evals[1:], key=lambda e: e[1])   # step 0 is never saved
    # the run is built to improve first and then get worse; check that it did
    assert best < evals[0][1] and best_iter < cfg.max_iters, evals
    assert any(loss > best for it, loss in evals if it > best_iter), evals
    state = json.loads((find_checkpoint(tmp_path / "r") / "state.json").read_text())
    assert state["best_val_loss"] == best
    assert state["iter"] == (cfg.max_iters if always_save else best_iter), evals
    # the saved weights are the ones of that step: their val loss is the best one, not the last one
    saved = GPT.from_pretrained(find_checkpoint(tmp_path / "r"))
    from npgpt.train import estimate_loss
    losses = estimate_loss(saved, sabotaged_data(char_data, 0), cfg, state["iter"], cfg.block_size)
    assert losses["val"] == pytest.approx(dict(evals)[state["iter"]], rel=1e-5)


# ---- npgpt bench --set beyond n_layer -----------------------------------------------------------
def bench_json(*sets):
    args = ["bench", "--json", "--batch-size", "2", "--iters", "1", "--warmup", "1"]
    for s in sets:
        args += ["--set", s]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def tensor_count(model):
    return sum(int(p.data.size) for _, p in model.named_parameters())


def test_bench_set_values_take_effect():
    sets = ["n_layer=1", "n_head=3", "n_embd=24", "block_size=8", "bias=false"]
    out = bench_json(*sets, "dropout=0.25")
    assert (out["n_layer"], out["n_head"], out["n_embd"], out["block_size"], out["dropout"]) == (1, 3, 24, 8, 0.25)
    expected = GPT(GPTConfig.preset("baby", n_layer=1, n_head=3, n_embd=24, block_size=8, bias=False))
    with_bias = GPT(GPTConfig.preset("baby", n_layer=1, n_head=3, n_embd=24, block_size=8, bias=True))
    assert out["params"] == tensor_count(expected) < tensor_count(with_bias)
    # dropout really runs in the timed training step: the same seeded step without it differs
    plain = bench_json(*sets, "dropout=0")
    assert plain["dropout"] == 0.0 and plain["final_loss"] != out["final_loss"]


# ---- npgpt info's parameter count ----------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])   # bias=False: issue 12 found info counting absent biases
def test_info_counts_the_model_tensors(tmp_path, bias):
    from safetensors.numpy import load_file
    cfg = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=bias)
    model = GPT(cfg, seed=0)
    model.save_pretrained(tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    stored = sum(a.size for name, a in tensors.items() if name != "lm_head.weight")   # the head is tied
    assert stored == tensor_count(model)
    r = CliRunner().invoke(cli, ["info", "--json", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["parameters"] == stored
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "m")])
    assert f"parameters: {stored:,}" in r.output


def test_info_count_for_a_model_with_n_inner(tmp_path):
    cfg = replace(GPTConfig(vocab_size=29, block_size=8, n_layer=1, n_head=2, n_embd=8), n_inner=20)
    model = GPT(cfg, seed=0)
    model.save_pretrained(tmp_path / "m")
    r = CliRunner().invoke(cli, ["info", "--json", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["parameters"] == tensor_count(model)


# ---- generation paths the mutation run found unguarded ---------------------------------------------
GEN_CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def gen_model():
    return GPT(GEN_CFG, seed=5).eval()


def test_top_k_1_tiny_top_p_and_top_p_1_are_accepted_and_mean_what_they_say(gen_model):
    from npgpt.generate import generate
    greedy = generate(gen_model, [1, 2], 6, temperature=0)
    assert generate(gen_model, [1, 2], 6, temperature=1.0, top_k=1, seed=0) == greedy
    assert generate(gen_model, [1, 2], 6, temperature=1.0, top_p=1e-6, seed=0) == greedy
    assert generate(gen_model, [1, 2], 6, temperature=1.0, top_p=1.0, seed=3) == \
        generate(gen_model, [1, 2], 6, temperature=1.0, seed=3)
    # top_p = 1 keeps every token, however unlikely
    p = sampling_probs(np.array([[0.0, -100.0, -200.0]]), 1.0, top_p=1.0)
    assert (p > 0).all()


def test_stream_top_alternatives_are_the_most_likely_tokens(gen_model):
    from npgpt.generate import generate_stream
    from npgpt.tensor import no_grad
    prompts = [[1, 2, 3], [4, 5, 6]]
    with no_grad():
        logits = gen_model(np.array(prompts))[0].data[:, -1].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    first = next(generate_stream(gen_model, prompts, 1, temperature=0))
    for s in first:
        want = sorted(range(GEN_CFG.vocab_size), key=lambda j: (-probs[s.row, j], j))[:5]
        assert [j for j, _ in s.top] == want
        np.testing.assert_allclose([q for _, q in s.top], probs[s.row, want], rtol=1e-6)
        assert s.token == want[0] and s.prob == pytest.approx(probs[s.row, want[0]], rel=1e-6)


def test_prompts_as_arrays_and_uncached_ragged_batches(gen_model):
    from npgpt.generate import generate
    prompts = [[1, 2, 3], [4, 5, 6]]
    expect = generate(gen_model, prompts, 5, temperature=0)
    assert generate(gen_model, np.array(prompts), 5, temperature=0) == expect
    assert generate(gen_model, np.array(prompts[1]), 5, temperature=0) == expect[1]
    ragged = [[1], [2, 3, 4, 5]]
    cached = generate(gen_model, ragged, 6, temperature=0)
    assert generate(gen_model, ragged, 6, temperature=0, use_cache=False) == cached
    assert cached == [generate(gen_model, r, 6, temperature=0) for r in ragged]


def test_stop_string_at_the_very_start():
    from npgpt.sampling import Detokenizer
    from npgpt.tokenizer import CharTokenizer
    tok = CharTokenizer.train("ab\ncdrestx")

    def text(s, stop):
        d = Detokenizer(tok, stop)
        out = "".join(d.add(t) for t in tok.encode(s))
        return out + d.flush()

    assert text("\nrest", "\n") == ""
    assert text("ab\ncd", ["x", "\n"]) == "ab"
    assert text("abc", None) == "abc"


# ---- autograd engine details the mutation run found unguarded ----------------------------------------
def test_gradients_never_alias_each_other_or_the_upstream_array():
    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(np.ones(3), requires_grad=True)
    g = np.array([1.0, 2.0, 3.0])
    (a + b).backward(g)                  # Add hands the same upstream array to both inputs
    (a * 3.0).backward(np.ones(3))       # a second backward accumulates into a.grad only
    np.testing.assert_array_equal(a.grad, [4.0, 5.0, 6.0])
    np.testing.assert_array_equal(b.grad, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(g, [1.0, 2.0, 3.0])


def test_only_leaves_and_retained_tensors_keep_a_grad():
    x = Tensor(np.arange(3.0), requires_grad=True)
    y, kept = x * 2.0, (x * 3.0).retain_grad()
    (y.sum() + kept.sum()).backward()
    assert y.grad is None
    np.testing.assert_array_equal(kept.grad, np.ones(3))
    np.testing.assert_array_equal(x.grad, np.full(3, 5.0))


def test_profiling_records_each_ops_own_clock_interval():
    from npgpt.tensor import profiling

    class TickClock:
        """Readings 1, 3, 6, 10, ...: the k-th reading is k seconds after the one before it."""
        def __init__(self):
            self.now, self.k, self.seen = 0.0, 0, []

        def clock(self):
            self.k += 1
            self.now += self.k
            return self.now

        def record(self, fn, phase, seconds):
            self.seen.append((phase, seconds, self.k))

    rec = TickClock()
    x = Tensor(np.ones(4), requires_grad=True)
    with profiling(rec):
        (x * 2.0).sum().backward()
    assert {phase for phase, _, _ in rec.seen} == {"forward", "backward"}
    for _, seconds, k in rec.seen:
        assert seconds == k          # end - start of two consecutive readings, the later being the k-th


# ---- small contracts the mutation run found unguarded -------------------------------------------------
def test_bpe_merge_progress_is_reported_every_percent_and_at_the_end():
    r = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    text = " ".join("".join(r.choice(letters[:12], r.integers(3, 9))) for _ in range(3000))
    calls = []
    BPETokenizer.train(text, 256 + 300 + 1, progress=lambda *a: calls.append(a))
    merges = [c for c in calls if c[0] == "merge"]
    assert merges == [("merge", k, 300) for k in range(3, 301, 3)]        # 300 // 100 = every 3rd
    calls.clear()
    BPETokenizer.train(text, 256 + 43 + 1, progress=lambda *a: calls.append(a))
    assert [c for c in calls if c[0] == "merge"] == [("merge", k, 43) for k in range(1, 44)]


def test_bpe_encodes_the_nul_byte():
    tok = BPETokenizer.train("\x00\x00 " * 10, 256 + 1 + 1)       # one merge: NUL + NUL
    pair = tok.encode("\x00\x00")
    assert len(pair) == 1 and pair[0] >= 256
    assert tok.encode("\x00\x00\x00") == [pair[0], 0]               # the byte token 0 stays
    for text in ("a\x00b", "\x00", "x\x00\x00\x00y"):
        ids = tok.encode(text)
        assert ids == tok._reference_encode(text) and tok.decode(ids) == text


def test_stack_and_concatenate_default_to_the_first_axis():
    from npgpt.ops import concatenate, stack
    a, b = Tensor(np.arange(3.0)), Tensor(np.arange(3.0, 6.0))
    np.testing.assert_array_equal(stack([a, b]).data, [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(concatenate([a, b]).data, np.arange(6.0))


def test_adamw_betas_must_stay_below_one_and_zero_is_allowed():
    def params():
        return [("w", SimpleNamespace(data=np.ones((2, 2), np.float32), grad=None))]
    for betas in [(1.0, 0.95), (0.9, 1.0)]:
        with pytest.raises(NpgptError, match="betas"):
            AdamW(params(), betas=betas)
    opt = AdamW(params(), lr=0.1, betas=(0.0, 0.0), weight_decay=0.0)   # plain sign-like steps
    opt.grad[...] = np.array([1.0, -2.0, 3.0, -4.0], np.float32)
    opt.step()
    np.testing.assert_allclose(opt.flat, 1.0 - 0.1 * np.sign(opt.grad), rtol=1e-6)


def test_clip_uses_pytorchs_coefficient_on_tiny_gradients():
    opt = AdamW([("w", SimpleNamespace(data=np.zeros((2, 2), np.float32), grad=None))])
    g = np.array([1.2e-6, 0.0, -1.6e-6, 0.0], np.float32)                 # norm 2e-6
    opt.grad[...] = g
    opt.clip_grad_norm(1e-6)
    # PyTorch: coef = max_norm / (norm + 1e-6) = 1e-6 / 3e-6, so the new norm is 2e-6 / 3, not 1e-6
    np.testing.assert_allclose(opt.grad, g / 3, rtol=1e-5)


def test_adamw_eps_sits_under_the_square_root_term():
    opt = AdamW([("w", SimpleNamespace(data=np.zeros((2, 2), np.float32), grad=None))], lr=0.1, weight_decay=0.0)
    opt.grad[...] = np.array([1e-8, -1e-8, 3e-8, 0.0], np.float32)   # |g| comparable to eps = 1e-8
    opt.step()
    g = opt.grad.astype(np.float64)
    np.testing.assert_allclose(opt.flat, -0.1 * g / (np.abs(g) + 1e-8), rtol=1e-5, atol=1e-9)  # 0.05, 0.075


@pytest.mark.parametrize("threads", ["2", "3"])
def test_row_blocks_on_several_threads_cover_every_row_once(monkeypatch, threads):
    import threading
    monkeypatch.setattr(parallel, "BLOCK_ELEMS", 8)
    monkeypatch.setenv("NPGPT_THREADS", threads)
    seen, workers = np.zeros(37, dtype=int), set()

    def kernel(r):
        seen[r] += 1
        workers.add(threading.current_thread().name)
        return r.start

    starts = parallel.for_row_blocks(37, 3, kernel, min_parallel=1)   # 14 blocks over the threads
    assert (seen == 1).all()
    assert starts == sorted(starts) and len(starts) == 14
    assert len(workers) >= 2                    # the pool ran a group, the caller another


@pytest.mark.parametrize("files", [
    [],                                                   # not a table
    {"a.bin": {"size": 3}},                               # no sha256
    {"a.bin": {"sha256": "00"}},                          # no size
    {"a.bin": "3 bytes"},                                 # not an entry
])
def test_a_damaged_manifest_table_is_a_clean_error(tmp_path, files):
    with checkpoint_writer(tmp_path) as tmp:
        (tmp / "a.bin").write_bytes(b"abc")
    ckpt = tmp_path / "ckpt"
    (ckpt / "manifest.json").write_text(json.dumps({"format": "npgpt-checkpoint", "version": 1, "files": files}))
    with pytest.raises(NpgptError, match="manifest.json is damaged"):
        verify_checkpoint(ckpt)
