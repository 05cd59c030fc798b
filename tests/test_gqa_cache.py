"""Grouped-query attention in cached decoding never forms repeated key/value heads: every array
made from the KV cache (slices, matmul operands) keeps the nkv heads, and no repeat, tile,
broadcast or concatenation is applied to it. The cache arrays are wrapped in an ndarray subclass
that logs what is done with them; the logits are checked against the uncached forward."""

import numpy as np

from npgpt.llama import Llama, LlamaConfig
from npgpt.tensor import Tensor


class Spy(np.ndarray):
    """An ndarray that logs every ufunc, NumPy function and slice applied to it."""
    log = []

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        if isinstance(out, Spy):
            Spy.log.append(("getitem", out.shape))
        return out

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        Spy.log.append((ufunc.__name__, [i.shape for i in inputs if isinstance(i, Spy)]))
        plain = [i.view(np.ndarray) if isinstance(i, Spy) else i for i in inputs]
        if "out" in kw:
            kw["out"] = tuple(o.view(np.ndarray) if isinstance(o, Spy) else o for o in kw["out"])
        return getattr(ufunc, method)(*plain, **kw)      # results are plain arrays: the log is of cache reads

    def __array_function__(self, func, types, args, kwargs):
        Spy.log.append((func.__name__, None))
        return super().__array_function__(func, types, args, kwargs)


def test_cached_decoding_reads_only_the_nkv_heads():
    nh, nkv = 6, 2
    cfg = LlamaConfig(vocab_size=50, block_size=16, n_layer=2, n_head=nh, n_kv_head=nkv, n_embd=24, n_inner=32)
    model = Llama(cfg, seed=0).eval()
    ids = np.random.default_rng(0).integers(0, 50, (2, 7))
    cache = model.new_cache(2)
    assert cache.k.shape == (2, 2, nkv, 16, 4) and cache.v.shape == cache.k.shape
    cache.k, cache.v = cache.k.view(Spy), cache.v.view(Spy)
    Spy.log = []
    logits = np.concatenate([model.forward_cached(ids[:, :5], cache), model.forward_cached(ids[:, 5:6], cache),
                             model.forward_cached(ids[:, 6:], cache)], axis=1)
    ref = model(Tensor(ids))[0].data
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
    matmuls = [shapes for name, shapes in Spy.log if name == "matmul"]
    assert len(matmuls) == 3 * 2 * 2                # 3 calls x 2 layers x (scores, values), all on the cache
    for shapes in matmuls:
        assert len(shapes) == 1 and shapes[0][:2] == (2, nkv)
    reads = [shape for name, shape in Spy.log if name == "getitem"]
    assert reads and all(len(s) == 5 and s[2] == nkv or len(s) == 4 and s[1] == nkv for s in reads)
    assert not [name for name, _ in Spy.log if name in ("repeat", "tile", "broadcast_to", "concatenate", "stack")]
