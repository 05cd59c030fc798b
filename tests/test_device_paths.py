"""One code path for both backends: dtype discipline in a training step, and CuPy == NumPy
(the CuPy half runs only where CuPy and a GPU are present; it skips cleanly elsewhere)."""

import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.backend import asnumpy, gpu_available, to_device
from npgpt.optim import AdamW
from npgpt.tensor import Tensor
from npgpt.train import train_step

CFG = GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.1)


def batch(xp, seed=0):
    r = np.random.default_rng(seed)
    x, y = r.integers(0, 17, (4, 8)), r.integers(0, 17, (4, 8))
    return xp.asarray(x), xp.asarray(y)


def test_no_float64_in_a_training_step(xp, monkeypatch):
    """Every tensor made during forward/backward, every gradient and optimizer buffer is float32."""
    model = GPT(CFG, seed=0)
    if xp is not np:
        model.to("gpu")
    opt = AdamW(model.named_parameters(), lr=1e-3)
    seen = []
    original = Tensor.__init__

    def spy(self, data, *a, **k):
        original(self, data, *a, **k)
        seen.append(self.data.dtype)
    monkeypatch.setattr(Tensor, "__init__", spy)
    train_step(model, opt, [batch(xp)], 1, grad_clip=1.0, lr=1e-3)
    monkeypatch.setattr(Tensor, "__init__", original)
    floats = {str(d) for d in seen if d.kind == "f"}
    assert floats == {"float32"}, floats
    for buf in (opt.flat, opt.grad, opt.exp_avg, opt.exp_avg_sq):
        assert buf.dtype == np.float32
    assert all(p.grad.dtype == np.float32 for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_cupy_matches_numpy_loss_and_every_gradient():
    cfg = GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16)
    cpu, gpu = GPT(cfg, seed=1), GPT(cfg, seed=1).to("gpu")   # initialised on the host: identical
    x, y = batch(np, 3)
    _, lc = cpu(x, y)
    _, lg = gpu(to_device(x, "gpu"), to_device(y, "gpu"))
    lc.backward()
    lg.backward()
    assert abs(float(lc.data) - float(asnumpy(lg.data))) <= 1e-5 * abs(float(lc.data))
    for (name, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
        g_cpu, g_gpu = pc.grad, asnumpy(pg.grad)
        err = np.abs(g_cpu - g_gpu).max() / max(np.abs(g_cpu).max(), 1e-12)
        assert err <= 1e-4, (name, err)
