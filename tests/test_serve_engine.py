"""The serve engine driven step by step (no thread, no HTTP): the prefix cache gives the same
tokens and logits as recomputing, stays within its bounds and evicts least recently used blocks;
chunked prefill lets running streams decode while a long prompt is prefilled."""

import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.llama import Llama, LlamaConfig
from npgpt.serve.engine import Prefill, PrefixCache
from npgpt.serve.http import App
from npgpt.tokenizer import CharTokenizer

from helpers import corpus


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train(corpus(300))


def _scaled(model):
    for p in model.parameters():          # peaked distributions: greedy never hinges on float noise
        if p.data.ndim > 1:
            p.data *= 3.0
    return model.eval()


@pytest.fixture(scope="module", params=["gpt", "llama"])
def model(request, tok):
    if request.param == "gpt":
        return _scaled(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32), seed=1))
    return _scaled(Llama(LlamaConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=4, n_kv_head=2,
                                     n_embd=32, n_inner=64), seed=2))


def _ids(rng, tok, n):
    return [int(t) for t in rng.integers(1, tok.vocab_size, n)]


def _run(app, bodies, max_steps=2000):
    """Submit completion requests (one after another finishes) and step the engine; per request:
    (tokens, [logprob of each token])."""
    out = []
    for body in bodies:
        req = app.completion_request(dict(body, temperature=0, logprobs=0))
        app.engine.submit(req)
        toks, lps, done = [], [], False
        for _ in range(max_steps):
            app.engine.step()
            while not req.events.empty():
                ev = req.events.get()
                assert ev[0] in ("delta", "finish"), ev
                if ev[0] == "delta":
                    toks += [t for t, _, _ in ev[3]]
                    lps += [lp for _, lp, _ in ev[3]]
                else:
                    done = True
            if done:
                break
        assert done
        out.append((toks, lps))
    return out


def test_prefix_reuse_gives_the_same_logits_and_keys(model):
    rng = np.random.default_rng(0)
    cfg = model.config
    shared = [int(t) for t in rng.integers(1, cfg.vocab_size, 37)]
    a, b = shared + [3, 4, 5], shared + [9, 8, 7, 6, 5]
    pc = PrefixCache(block_tokens=8)
    like = model.new_cache(1).k
    first = Prefill(model, a, [], like)
    first.reuse(pc.lookup(a))
    assert first.reused == 0 and first.run(model, 1000) == len(a)
    pc.insert(a, first.cache.k[:, 0], first.cache.v[:, 0])
    assert len(pc) == len(a) // 8                      # the whole blocks of a: 5
    hit = Prefill(model, b, [], like)
    hit.reuse(pc.lookup(b))
    assert hit.reused == 32                            # 4 whole blocks are shared (37 tokens)
    while hit.logits is None:
        hit.run(model, 3)                              # chunked, too
    fresh = Prefill(model, b, [], like)
    fresh.run(model, 1000)
    np.testing.assert_allclose(hit.logits, fresh.logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(hit.cache.k, fresh.cache.k, atol=1e-5, rtol=0)
    np.testing.assert_allclose(hit.cache.v, fresh.cache.v, atol=1e-5, rtol=0)
    assert np.abs(hit.logits - first.logits).max() > 1e-3   # another prompt's logits would fail


def test_engine_with_prefix_cache_decodes_as_without(model, tok):
    rng = np.random.default_rng(1)
    system = _ids(rng, tok, 30)
    bodies = [{"prompt": system + _ids(rng, tok, k), "max_tokens": 12} for k in (5, 9, 2)]
    bodies.append({"prompt": bodies[0]["prompt"], "max_tokens": 12})          # an exact repeat
    on = App(model, tok, "m", engine_options={"prefix_cache_mb": 16, "prefix_block": 4, "prefill_chunk": 7})
    off = App(model, tok, "m", engine_options={"prefix_cache_mb": 0})
    got, ref = _run(on, bodies), _run(off, bodies)
    for (t1, l1), (t2, l2) in zip(got, ref):
        assert t1 == t2 and len(t1) == 12
        np.testing.assert_allclose(l1, l2, atol=1e-5, rtol=0)
    st = on.engine.stats
    assert (st["prefix_cache_hits"], st["prefix_cache_misses"]) == (3, 1)
    assert st["prefix_cache_hit_tokens"] == 28 + 28 + 32          # shared whole 4-token blocks of prompt[:-1]
    assert st["prefix_cache_blocks"] > 0 and st["prefix_cache_bytes"] > 0
    assert off.engine.stats["prefix_cache_hits"] == 0 and off.engine.prefix is None


def test_prompts_admitted_together_share_their_prefix(model, tok):
    """A burst of requests with one system prompt: each looks the cache up when its prefill starts,
    so the later ones reuse what the first computed in the same burst."""
    rng = np.random.default_rng(3)
    system = _ids(rng, tok, 24)
    prompts = [system + _ids(rng, tok, 3) for _ in range(3)]
    outs = []
    for opts in ({"prefix_block": 8, "prefill_chunk": 64}, {"prefix_cache_mb": 0}):
        app = App(model, tok, "m", engine_options=opts)
        reqs = [app.completion_request({"prompt": p, "max_tokens": 6, "temperature": 0}) for p in prompts]
        for r in reqs:
            app.engine.submit(r)
        for _ in range(50):
            app.engine.step()
        assert all(s.finish in ("length", "stop") for r in reqs for s in r.seqs)
        outs.append(([s.tokens for r in reqs for s in r.seqs], dict(app.engine.stats)))
    (got, st), (ref, _) = outs
    assert st["prefix_cache_misses"] == 1 and st["prefix_cache_hits"] == 2 and st["prefix_cache_hit_tokens"] == 48
    assert st["prefill_tokens"] == 27 + 3 + 3 and got == ref


def test_prefix_cache_bounds_and_lru_eviction():
    n_layer, nkv, hs, b = 2, 1, 4, 2
    block_bytes = 2 * n_layer * nkv * b * hs * 4

    def kv(n, fill):
        k = np.full((n_layer, nkv, n, hs), fill, np.float32)
        return k, -k

    pc = PrefixCache(block_tokens=b, max_bytes=4 * block_bytes, max_request_bytes=3 * block_bytes)
    assert pc.insert([1, 2, 3, 4, 5], *kv(5, 1.0)) == 2 * block_bytes       # 2 whole blocks; the 5th token is not
    assert pc.insert([1, 2, 7, 7], *kv(4, 2.0)) == block_bytes              # shares the first block
    assert pc.bytes == 3 * block_bytes and len(pc) == 3
    assert [n.tokens for n in pc.lookup([1, 2, 3, 4, 9])] == [(1, 2), (3, 4)]   # touches 1,2 -> 3,4
    assert pc.lookup([1, 2, 3, 4])[-1].tokens == (1, 2)                   # never the prompt's last token
    # one request may add at most 3 blocks: [8, 8, 8, 8, ...] keeps 3 of its 5
    assert pc.insert([8] * 10, *kv(10, 3.0)) == 3 * block_bytes
    assert pc.bytes <= pc.max_bytes and pc.bytes == 4 * block_bytes
    # the least recently used leaves went first: (7, 7), then (3, 4); (1, 2) was used since
    assert pc.evictions == 2
    assert [n.tokens for n in pc.lookup([1, 2, 7, 7, 0])] == [n.tokens for n in pc.lookup([1, 2, 3, 4, 0])] == [(1, 2)]
    assert [n.tokens for n in pc.lookup([8] * 7)] == [(8, 8)] * 3
    np.testing.assert_array_equal(pc.lookup([8] * 3)[0].v, -3.0)
    pc.clear()
    assert pc.bytes == 0 and len(pc) == 0 and pc.root.children == {}


def test_chunked_prefill_lets_running_streams_decode(model, tok):
    """A 60-token prompt prefilled 6 tokens a step: the running stream gets a token on each of those
    steps; with one big chunk the long prompt is ready at once."""
    rng = np.random.default_rng(2)
    for chunk, expect in ((6, 10), (1000, 1)):
        app = App(model, tok, "m", engine_options={"prefill_chunk": chunk, "prefix_cache_mb": 0})
        eng = app.engine
        short = app.completion_request({"prompt": _ids(rng, tok, 4), "max_tokens": 40, "temperature": 0})
        eng.submit(short)
        eng.step()
        assert len(eng.active) == 1 and eng.steps == 1
        long = app.completion_request({"prompt": _ids(rng, tok, 60), "max_tokens": 5, "temperature": 0})
        eng.submit(long)
        steps = 0
        while not long.seqs[0].tokens:
            before = (len(short.seqs[0].tokens), eng.steps)
            eng.step()
            steps += 1
            assert (len(short.seqs[0].tokens), eng.steps) == (before[0] + 1, before[1] + 1)   # never paused
        assert steps == expect
        assert eng.stats["prefill_tokens"] == 64 and eng.stats["prefill_chunks"] == 1 + expect


def test_serve_rejects_bad_engine_flags(tmp_path):
    from click.testing import CliRunner
    from npgpt.cli.main import cli
    for flag, value in (("--prefill-chunk", "0"), ("--prefix-cache-mb", "-1"), ("--prefix-request-mb", "nan"),
                        ("--context", "0")):
        r = CliRunner().invoke(cli, ["serve", "--checkpoint", str(tmp_path), flag, value])
        assert r.exit_code != 0 and flag in r.output and "Traceback" not in r.output, r.output


def test_context_caps_the_cache_and_the_requests(tok):
    """--context: the engine's cache holds max_batch x context positions, a request past it is the
    400 a request past the model's own context is, and shorter ones decode as before."""
    from npgpt.errors import NpgptError
    from npgpt.serve.protocol import ApiError
    from npgpt.serve.http import cap_context

    def fresh():
        return _scaled(Llama(LlamaConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=4, n_kv_head=2,
                                         n_embd=32, n_inner=64), seed=2))
    with pytest.raises(NpgptError, match="longer than the model's context"):
        cap_context(fresh(), 97)
    body = {"prompt": _ids(np.random.default_rng(3), tok, 20), "max_tokens": 8}
    full = App(fresh(), tok, "m", max_batch=2)
    capped = App(cap_context(fresh(), 40), tok, "m", max_batch=2)
    assert capped.engine.cache.k.shape[3] == 40 and full.engine.cache.k.shape[3] == 96
    assert _run(capped, [body]) == _run(full, [body])          # within the cap: the same tokens and logprobs
    with pytest.raises(ApiError) as e:
        capped.completion_request(dict(body, max_tokens=30))   # 20 + 30 > 40
    assert e.value.status == 400 and "context" in str(e.value.code)
