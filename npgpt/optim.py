"""AdamW over flat buffers, the learning-rate schedule, and gradient clipping.

Like llm.c, the optimizer keeps every parameter, every gradient and both Adam moments in four flat
contiguous arrays (NumPy or CuPy, whichever holds the parameters):

    flat  = [ decayed params (matrices, embeddings) | non-decayed params (biases, LayerNorm) ]
    grad  = [ same layout ]            exp_avg, exp_avg_sq = [ same layout ]

At construction each parameter's `data` is copied into `flat` and rebound to a view of its slice, and
its `grad` to a view of the matching slice of `grad`. The autograd engine adds gradients into an
existing `grad` in place, so backward writes straight into the buffer, and one vectorised update
serves all parameters; the weight decay touches only the leading slice.

The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay, Loshchilov & Hutter 2019):

    p  <- p - lr * wd * p                      (decayed slice only)
    m  <- b1 m + (1 - b1) g
    v  <- b2 v + (1 - b2) g^2
    p  <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Everything runs in the parameters' dtype (float32): scalars are Python floats, which NumPy 2 and
CuPy treat as "weak" and never promote an array to float64.

The schedule `get_lr` is nanoGPT's: linear warmup, cosine decay to `min_lr`, then `min_lr`.
"""

from __future__ import annotations

import math

import numpy as np

from npgpt.backend import asnumpy, get_xp
from npgpt.errors import NpgptError
from npgpt.ops import cuda_kernels as _ck
from npgpt.ops.parallel import for_row_blocks
from npgpt.safeio import Int, check_finite_tensors, check_value


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """Learning rate at iteration `it`: linear warmup, cosine decay to `min_lr`, then `min_lr`.

    Warmup follows nanoGPT, `lr * (it + 1) / (warmup_iters + 1)`, so step 0 already moves a little.
    """
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(lr_decay_iters - warmup_iters, 1)   # 0 -> 1 over the decay
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))                       # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


class _Slot:
    """Where one parameter lives in the flat buffers."""

    __slots__ = ("name", "param", "start", "stop", "shape", "data_view", "grad_view")

    def __init__(self, name, param, start, stop, shape, data_view, grad_view):
        self.name, self.param, self.start, self.stop, self.shape = name, param, start, stop, shape
        self.data_view, self.grad_view = data_view, grad_view


class AdamW:
    """AdamW with decoupled weight decay on >= 2-D parameters, over flat buffers (see module doc).

    named_params: list of (name, param); each param has `.data` (float array) and `.grad` (array or
    None). Names key the optimizer state in checkpoints, so they must be unique.
    """

    def __init__(self, named_params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        named = list(named_params)
        if not named:
            raise NpgptError("the optimizer got no parameters: the model has nothing to train")
        names = [name for name, _ in named]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise NpgptError(f"parameter names must be unique for the optimizer state, repeated: {dup}")
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise NpgptError(f"betas must lie in [0, 1), got {tuple(betas)}")
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise NpgptError(f"need lr >= 0, eps > 0 and weight_decay >= 0 (got {lr}, {eps}, {weight_decay})")
        self.lr, self.betas = float(lr), (float(b1), float(b2))
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.t = 0   # number of steps taken (the t of the bias corrections)

        # nanoGPT's grouping: every tensor with >= 2 dims (matmul weights, embeddings) decays.
        decay = [(n, p) for n, p in named if p.data.ndim >= 2]
        no_decay = [(n, p) for n, p in named if p.data.ndim < 2]
        ordered = decay + no_decay
        xp = get_xp(ordered[0][1].data)
        dtype = ordered[0][1].data.dtype
        for name, p in ordered:
            if get_xp(p.data) is not xp:
                raise NpgptError(f"parameter {name} is on another device than {ordered[0][0]}; "
                                 f"move the whole model with model.to(device) before building the optimizer")
            if p.data.dtype != dtype or dtype.kind != "f":
                raise NpgptError(f"all parameters must share one float dtype for the optimizer "
                                 f"({ordered[0][0]} is {dtype}, {name} is {p.data.dtype})")
        self.xp, self.dtype = xp, dtype
        sizes = [int(p.data.size) for _, p in ordered]
        self.n_decay = sum(sizes[:len(decay)])     # the decayed slice is flat[:n_decay]
        self.n_decay_tensors, self.n_no_decay_tensors = len(decay), len(no_decay)
        total = sum(sizes)

        self.flat = xp.empty(total, dtype=dtype)        # (N,) all parameters
        self.grad = xp.zeros(total, dtype=dtype)        # (N,) all gradients
        self.exp_avg = xp.zeros(total, dtype=dtype)     # (N,) first moment m
        self.exp_avg_sq = xp.zeros(total, dtype=dtype)  # (N,) second moment v
        self._scratch = xp.empty(total, dtype=dtype)    # (N,) reused so a step allocates nothing

        self.slots: list[_Slot] = []
        start = 0
        for (name, p), size in zip(ordered, sizes):
            stop = start + size
            shape = tuple(p.data.shape)
            self.flat[start:stop] = p.data.reshape(-1)
            data_view = self.flat[start:stop].reshape(shape)
            grad_view = self.grad[start:stop].reshape(shape)
            p.data, p.grad = data_view, grad_view
            self.slots.append(_Slot(name, p, start, stop, shape, data_view, grad_view))
            start = stop
        self._by_name = {s.name: s for s in self.slots}

    # -------------------------------------------------------------------------------- reporting

    def describe(self) -> str:
        """Group sizes, worded like nanoGPT's configure_optimizers printout."""
        n_no = self.flat.size - self.n_decay
        return (f"num decayed parameter tensors: {self.n_decay_tensors}, with {self.n_decay:,} parameters; "
                f"num non-decayed parameter tensors: {self.n_no_decay_tensors}, with {n_no:,} parameters")

    # ------------------------------------------------------------------------------- gradients

    def _sync_views(self):
        """Re-attach parameters whose `data` or `grad` someone replaced, copying their values in.

        The fast path is one identity check per parameter. A replaced `grad` (or `None`, e.g. after a
        tensor-level zero_grad) would otherwise be silently ignored by the flat update.
        """
        for s in self.slots:
            p = s.param
            if p.data is not s.data_view:
                self._copy_in(s, p.data, self.flat, "data")
                p.data = s.data_view
            if p.grad is not s.grad_view:
                if p.grad is None:
                    self.grad[s.start:s.stop] = 0
                else:
                    self._copy_in(s, p.grad, self.grad, "grad")
                p.grad = s.grad_view

    def _copy_in(self, s: _Slot, value, buffer, what):
        if tuple(value.shape) != s.shape:
            raise NpgptError(f"parameter {s.name} changed shape from {s.shape} to {tuple(value.shape)} after "
                             f"the optimizer was built; build a new optimizer after resizing the model")
        if get_xp(value) is not self.xp:
            raise NpgptError(f"parameter {s.name} {what} moved to another device after the optimizer was built; "
                             f"call model.to(device) before building the optimizer")
        buffer[s.start:s.stop] = value.reshape(-1)

    def zero_grad(self):
        """Zero every gradient with one fill of the flat buffer (and re-attach replaced grads)."""
        self.grad.fill(0)
        for s in self.slots:
            if s.param.grad is not s.grad_view:
                s.param.grad = s.grad_view
            if s.param.data is not s.data_view:
                self._copy_in(s, s.param.data, self.flat, "data")
                s.param.data = s.data_view

    def grad_norm(self):
        """Global L2 norm of all gradients, a 0-d array on the parameters' device (no sync)."""
        self._sync_views()
        g = self.grad
        if _ck.use_kernels(g):
            return _ck.grad_norm(g)                           # one reduction kernel
        return self.xp.sqrt(self.xp.dot(g, g))

    def clip_grad_norm(self, max_norm: float, norm=None):
        """Scale all gradients so their global L2 norm is at most `max_norm`; return the norm before.

        `max_norm <= 0` disables clipping. The norm comes back as a 0-d array: reading it on the GPU
        (`float(norm)`) is a device sync, left to the caller's log points. A caller that already
        holds the norm of the current gradients passes it as `norm` (saves one pass over them).
        """
        if norm is None:
            norm = self.grad_norm()
        if max_norm is None or max_norm <= 0:
            return norm
        # PyTorch's clip_grad_norm_: coef = max_norm / (norm + 1e-6), applied only when below 1.
        if self.xp is np:
            if float(norm) > max_norm:
                self.grad *= max_norm / (float(norm) + 1e-6)
        else:
            # On the GPU a branch on `norm` would wait for the device; a clamped multiply does not.
            coef = self.xp.minimum(max_norm / (norm + 1e-6), 1.0).astype(self.dtype)
            self.grad *= coef
        return norm

    # ---------------------------------------------------------------------------------- update

    def step(self, lr: float | None = None):
        """One AdamW update of every parameter from the gradients in the flat buffer."""
        self._sync_views()
        xp = self.xp
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        self.t += 1
        bias1 = 1.0 - b1 ** self.t
        bias2 = 1.0 - b2 ** self.t
        p, g, m, v, tmp = self.flat, self.grad, self.exp_avg, self.exp_avg_sq, self._scratch
        decay = 1.0 - lr * self.weight_decay if self.weight_decay else 1.0
        n_decay = self.n_decay
        if _ck.use_kernels(p, g, m, v):                       # GPU: one kernel over the flat buffers
            _ck.adamw_step(p, g, m, v, lr, b1, b2, self.eps, self.weight_decay, self.t, n_decay)
            return

        def update(r):
            """All passes on one cache-sized block of the flat buffers (blocks run on all cores)."""
            pr, gr, mr, vr, tr = p[r], g[r], m[r], v[r], tmp[r]
            if decay != 1.0 and r.start < n_decay:
                p[r.start:min(r.stop, n_decay)] *= decay        # decoupled: before the Adam step
            # m <- b1 m + (1 - b1) g
            xp.multiply(gr, 1.0 - b1, out=tr)
            mr *= b1
            mr += tr
            # v <- b2 v + (1 - b2) g^2
            xp.multiply(gr, gr, out=tr)
            tr *= 1.0 - b2
            vr *= b2
            vr += tr
            # p <- p - (lr / bias1) * m / (sqrt(v) / sqrt(bias2) + eps)   (PyTorch's arrangement)
            xp.sqrt(vr, out=tr)
            tr *= 1.0 / math.sqrt(bias2)
            tr += self.eps
            xp.divide(mr, tr, out=tr)
            tr *= lr / bias1
            pr -= tr

        # Pure elementwise work with no matmul before it: worth both cores even at 0.8M values.
        for_row_blocks(p.shape[0], 1, update, xp, min_parallel=1 << 18)

    # ---------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """(tensors, meta): the moments per parameter name as host arrays, and the step + settings."""
        m, v = asnumpy(self.exp_avg), asnumpy(self.exp_avg_sq)   # one device->host copy each
        tensors = {}
        for s in self.slots:
            tensors[f"exp_avg.{s.name}"] = np.ascontiguousarray(m[s.start:s.stop].reshape(s.shape))
            tensors[f"exp_avg_sq.{s.name}"] = np.ascontiguousarray(v[s.start:s.stop].reshape(s.shape))
        meta = {"type": "AdamW", "step": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "dtype": str(self.dtype),
                "decayed": [s.name for s in self.slots[:self.n_decay_tensors]]}
        return tensors, meta

    def load_state_dict(self, tensors: dict, meta: dict):
        """Restore moments and step from `state_dict()` output (same parameter names and shapes)."""
        if not isinstance(meta, dict) or "step" not in meta:
            raise NpgptError("optimizer state has no step count; the checkpoint's state.json is damaged")
        step = check_value(meta["step"], Int(lo=0), "state.json: field 'optimizer.step'")
        check_finite_tensors(tensors, "optimizer.safetensors")
        expected = {f"{kind}.{s.name}": s for s in self.slots for kind in ("exp_avg", "exp_avg_sq")}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise NpgptError(f"optimizer state lacks {len(missing)} tensor(s), e.g. {missing[0]}; "
                             f"it belongs to a different model (use --init-from instead of --resume)")
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise NpgptError(f"optimizer state has tensors for unknown parameters, e.g. {unexpected[0]}; "
                             f"it belongs to a different model (use --init-from instead of --resume)")
        for key, s in expected.items():
            if tuple(tensors[key].shape) != s.shape:
                raise NpgptError(f"optimizer state {key} has shape {tuple(tensors[key].shape)}, the parameter "
                                 f"has {s.shape}; it belongs to a different model")
        m = np.empty(self.flat.size, dtype=self.dtype)
        v = np.empty(self.flat.size, dtype=self.dtype)
        for s in self.slots:
            m[s.start:s.stop] = np.asarray(tensors[f"exp_avg.{s.name}"]).reshape(-1)
            v[s.start:s.stop] = np.asarray(tensors[f"exp_avg_sq.{s.name}"]).reshape(-1)
        self.exp_avg[...] = self.xp.asarray(m)
        self.exp_avg_sq[...] = self.xp.asarray(v)
        # Hyperparameters stay as constructed: the caller's config (the checkpoint's, on resume) rules.
        self.t = step
