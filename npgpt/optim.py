"""AdamW over flat buffers, the learning-rate schedule, and gradient clipping.

Like llm.c, the optimizer keeps every parameter, every gradient and both Adam moments in four flat
contiguous arrays (NumPy or CuPy, whichever holds the parameters):

    flat  = [ decayed params (matrices, embeddings) | non-decayed params (biases, LayerNorm) ]
    grad  = [ same layout ]            exp_avg, exp_avg_sq = [ same layout ]

`FlatParams` owns the first two: at construction it copies each parameter's `data` into `flat` and
binds it to a view of its slice, and its `grad` to a view of the matching slice of `grad`, once.
The autograd engine adds gradients into an existing `grad` in place, so backward writes straight
into the buffer, and one vectorised update serves all parameters; the weight decay touches only
the leading slice.

The update is one pure function, `adamw_update(p, g, m, v, n_decay, ...)`, handed the flat arrays:
AdamW calls it on all of them, ZeroAdamW (npgpt.distributed) on its shard, and the tests hold the
GPU kernel to it. It is PyTorch's `torch.optim.AdamW` (decoupled weight decay, Loshchilov & Hutter
2019):

    p  <- p - lr * wd * p                      (decayed slice only)
    m  <- b1 m + (1 - b1) g
    v  <- b2 v + (1 - b2) g^2
    p  <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Everything runs in the parameters' dtype (float32): scalars are Python floats, which NumPy 2 and
CuPy treat as "weak" and never promote an array to float64.

The schedule `get_lr` is nanoGPT's: linear warmup, cosine decay to `min_lr`, then `min_lr`.

`Muon` (Keller Jordan 2024, the modded-nanogpt speedrun's optimizer) sits beside AdamW: the hidden
matrices of the transformer blocks take momentum, then the momentum's update orthogonalised by a few
Newton-Schulz iterations (`newton_schulz`, `muon_update`); everything else (embeddings, an untied
head, norms, biases) takes AdamW's arithmetic. Both groups live in one flat buffer, hidden matrices
first, so gradient accumulation, clipping and data-parallel reduction see one array as with AdamW.
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


def adamw_update(p, g, m, v, n_decay, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0,
                 scratch=None):
    """One AdamW step on flat arrays (llm.c's `adamw_update` loop, in array form): p, m, v are
    updated in place and returned. The only AdamW formula on the CPU: AdamW calls it on its flat
    buffers, ZeroAdamW on its shard, and the GPU kernel (`cuda_kernels.adamw_step`) is tested
    against it. Pure: it keeps nothing between calls.

    p, g, m, v: (N,) arrays of one float dtype (NumPy, or CuPy for an unfused run); weight decay
    applies to p[:n_decay]; step: t after incrementing (1 for the first step); grad_scale
    multiplies g first (the kernel's clipping / loss-scale factor); scratch: an (N,) array to
    reuse so a step allocates nothing.
    """
    xp = get_xp(p)
    if grad_scale != 1.0:
        g = g * grad_scale
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    decay = 1.0 - lr * weight_decay if weight_decay else 1.0
    tmp = xp.empty_like(p) if scratch is None else scratch

    def update(r):
        """All passes on one cache-sized block of the flat arrays (blocks run on all cores)."""
        pr, gr, mr, vr, tr = p[r], g[r], m[r], v[r], tmp[r]
        if decay != 1.0 and r.start < n_decay:
            p[r.start:min(r.stop, n_decay)] *= decay        # decoupled: before the Adam step
        # m <- b1 m + (1 - b1) g
        xp.multiply(gr, 1.0 - beta1, out=tr)
        mr *= beta1
        mr += tr
        # v <- b2 v + (1 - b2) g^2
        xp.multiply(gr, gr, out=tr)
        tr *= 1.0 - beta2
        vr *= beta2
        vr += tr
        # p <- p - (lr / bias1) * m / (sqrt(v) / sqrt(bias2) + eps)   (PyTorch's arrangement)
        xp.sqrt(vr, out=tr)
        tr *= 1.0 / math.sqrt(bias2)
        tr += eps
        xp.divide(mr, tr, out=tr)
        tr *= lr / bias1
        pr -= tr

    # Pure elementwise work with no matmul before it: worth both cores even at 0.8M values.
    for_row_blocks(p.shape[0], 1, update, xp, min_parallel=1 << 18)
    return p, m, v


class _Slot:
    """Where one parameter lives in the flat buffers."""

    __slots__ = ("name", "param", "start", "stop", "shape", "data_view", "grad_view")

    def __init__(self, name, param, start, stop, shape, data_view, grad_view):
        self.name, self.param, self.start, self.stop, self.shape = name, param, start, stop, shape
        self.data_view, self.grad_view = data_view, grad_view


class FlatParams:
    """Every parameter and every gradient of one optimizer in two flat buffers (llm.c's layout), and
    the one owner of the parameters' views into them.

        data = [ decayed params (>= 2-D: matrices, embeddings) | the others (biases, LayerNorm) ]
        grad = [ same layout ]

    At construction each parameter's values are copied into `data`, and its `data` and `grad` are
    bound to views of its slices: the autograd engine adds gradients into an existing `grad` in
    place, so backward writes straight into the buffer. Reading `data` or `grad` hands out the
    buffer after one identity check per parameter: a view someone replaced (a `model.zero_grad()`
    that set `grad = None`, a new `data` array) is copied in and bound again here, so no caller ever
    has to re-sync anything.

    named_params: list of (name, param); each param has `.data` (float array) and `.grad` (array or
    None). Names key the optimizer state in checkpoints, so they must be unique.
    """

    def __init__(self, named_params):
        named = list(named_params)
        if not named:
            raise NpgptError("the optimizer got no parameters: the model has nothing to train")
        names = [name for name, _ in named]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise NpgptError(f"parameter names must be unique for the optimizer state, repeated: {dup}")
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
        self.n_decay = sum(sizes[:len(decay)])     # the decayed slice is data[:n_decay]
        self.n_decay_tensors, self.n_no_decay_tensors = len(decay), len(no_decay)
        self.size = sum(sizes)
        self._data = xp.empty(self.size, dtype=dtype)   # (N,) all parameters
        self._grad = xp.zeros(self.size, dtype=dtype)   # (N,) all gradients

        self.slots: list[_Slot] = []
        start = 0
        for (name, p), size in zip(ordered, sizes):
            stop = start + size
            shape = tuple(p.data.shape)
            self._data[start:stop] = p.data.reshape(-1)
            data_view = self._data[start:stop].reshape(shape)
            grad_view = self._grad[start:stop].reshape(shape)
            p.data, p.grad = data_view, grad_view          # bound once, here
            self.slots.append(_Slot(name, p, start, stop, shape, data_view, grad_view))
            start = stop

    @property
    def data(self):
        """(N,) all parameters (bound views checked first)."""
        self._check_views()
        return self._data

    @property
    def grad(self):
        """(N,) all gradients (bound views checked first)."""
        self._check_views()
        return self._grad

    def _check_views(self):
        """Copy in and re-bind parameters whose `data` or `grad` someone replaced. The fast path is
        one identity check per parameter; a replaced `grad` (or `None`) would otherwise be silently
        ignored by the flat update."""
        for s in self.slots:
            p = s.param
            if p.data is not s.data_view:
                self._copy_in(s, p.data, self._data, "data")
                p.data = s.data_view
            if p.grad is not s.grad_view:
                if p.grad is None:
                    self._grad[s.start:s.stop] = 0
                else:
                    self._copy_in(s, p.grad, self._grad, "grad")
                p.grad = s.grad_view

    def _copy_in(self, s: _Slot, value, buffer, what):
        if tuple(value.shape) != s.shape:
            raise NpgptError(f"parameter {s.name} changed shape from {s.shape} to {tuple(value.shape)} after "
                             f"the optimizer was built; build a new optimizer after resizing the model")
        if get_xp(value) is not self.xp:
            raise NpgptError(f"parameter {s.name} {what} moved to another device after the optimizer was built; "
                             f"call model.to(device) before building the optimizer")
        buffer[s.start:s.stop] = value.reshape(-1)


class AdamW:
    """AdamW with decoupled weight decay on >= 2-D parameters, over flat buffers (see module doc).

    named_params: list of (name, param); each param has `.data` (float array) and `.grad` (array or
    None). Names key the optimizer state in checkpoints, so they must be unique. The parameters'
    buffers are `self.params` (FlatParams); the moments are this object's own.
    """

    def __init__(self, named_params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        named = list(named_params)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise NpgptError(f"betas must lie in [0, 1), got {tuple(betas)}")
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise NpgptError(f"need lr >= 0, eps > 0 and weight_decay >= 0 (got {lr}, {eps}, {weight_decay})")
        self.lr, self.betas = float(lr), (float(b1), float(b2))
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.t = 0                    # number of steps taken (the t of the bias corrections)
        self.params = FlatParams(named)
        self.xp, self.dtype = self.params.xp, self.params.dtype
        n = self.params.size
        self.exp_avg, self.exp_avg_sq = self._moments(n)      # (N,) first and second moments m, v
        self._scratch = self.xp.empty_like(self.exp_avg)      # (N,) reused so a step allocates nothing

    def _moments(self, n):
        return self.xp.zeros(n, dtype=self.dtype), self.xp.zeros(n, dtype=self.dtype)

    # the flat buffers and their layout, owned by self.params
    flat = property(lambda self: self.params.data, doc="(N,) all parameters")
    grad = property(lambda self: self.params.grad, doc="(N,) all gradients")
    slots = property(lambda self: self.params.slots)
    n_decay = property(lambda self: self.params.n_decay, doc="the decayed slice is flat[:n_decay]")
    n_decay_tensors = property(lambda self: self.params.n_decay_tensors)
    n_no_decay_tensors = property(lambda self: self.params.n_no_decay_tensors)

    # -------------------------------------------------------------------------------- reporting

    def describe(self) -> str:
        """Group sizes, worded like nanoGPT's configure_optimizers printout."""
        n_no = self.flat.size - self.n_decay
        return (f"num decayed parameter tensors: {self.n_decay_tensors}, with {self.n_decay:,} parameters; "
                f"num non-decayed parameter tensors: {self.n_no_decay_tensors}, with {n_no:,} parameters")

    # ------------------------------------------------------------------------------- gradients

    def zero_grad(self):
        """Zero every gradient with one fill of the flat buffer."""
        self.grad.fill(0)

    def grad_norm(self):
        """Global L2 norm of all gradients, a 0-d array on the parameters' device (no sync)."""
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
        g = self.grad
        if self.xp is np:
            if float(norm) > max_norm:
                g *= max_norm / (float(norm) + 1e-6)
        else:
            # On the GPU a branch on `norm` would wait for the device; a clamped multiply does not.
            g *= self.xp.minimum(max_norm / (norm + 1e-6), 1.0).astype(self.dtype)
        return norm

    # ---------------------------------------------------------------------------------- update

    def step(self, lr: float | None = None):
        """One AdamW update of every parameter from the gradients in the flat buffer."""
        self.t += 1
        self._update(self.flat, self.grad, self.exp_avg, self.exp_avg_sq, self.n_decay, lr)

    def _update(self, p, g, m, v, n_decay, lr=None):
        """adamw_update on these flat arrays at step self.t (on the GPU, the same in one kernel)."""
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        if _ck.use_kernels(p, g, m, v):                       # GPU: one kernel over the flat buffers
            _ck.adamw_step(p, g, m, v, lr, b1, b2, self.eps, self.weight_decay, self.t, n_decay)
            return
        adamw_update(p, g, m, v, n_decay, lr=lr, beta1=b1, beta2=b2, eps=self.eps,
                     weight_decay=self.weight_decay, step=self.t, scratch=self._scratch[:p.size])

    # ---------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """(tensors, meta): the moments per parameter name as host arrays, and the step + settings."""
        return self._state(self.exp_avg, self.exp_avg_sq)

    def _state(self, exp_avg, exp_avg_sq):
        m, v = asnumpy(exp_avg), asnumpy(exp_avg_sq)   # one device->host copy each
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
        m, v, self.t = self._read_state(tensors, meta)
        self.exp_avg[...] = self.xp.asarray(m)
        self.exp_avg_sq[...] = self.xp.asarray(v)

    def _read_state(self, tensors: dict, meta: dict):
        """Check a saved state against this optimizer -> (full m, full v as host arrays, step)."""
        expected = {f"{kind}.{s.name}": s for s in self.slots for kind in ("exp_avg", "exp_avg_sq")}
        step = check_state(tensors, meta, expected)
        m = np.empty(self.params.size, dtype=self.dtype)
        v = np.empty(self.params.size, dtype=self.dtype)
        for s in self.slots:
            m[s.start:s.stop] = np.asarray(tensors[f"exp_avg.{s.name}"]).reshape(-1)
            v[s.start:s.stop] = np.asarray(tensors[f"exp_avg_sq.{s.name}"]).reshape(-1)
        # Hyperparameters stay as constructed: the caller's config (the checkpoint's, on resume) rules.
        return m, v, step


def check_state(tensors: dict, meta: dict, expected: dict) -> int:
    """A saved optimizer state (tensors, meta) checked against `expected` {tensor name: its slot}:
    a step count, finite values, exactly the expected names, their shapes. Returns the step."""
    if not isinstance(meta, dict) or "step" not in meta:
        raise NpgptError("optimizer state has no step count; the checkpoint's state.json is damaged")
    step = check_value(meta["step"], Int(lo=0), "state.json: field 'optimizer.step'")
    check_finite_tensors(tensors, "optimizer.safetensors")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise NpgptError(f"optimizer state lacks {len(missing)} tensor(s), e.g. {missing[0]}; it belongs to a "
                         f"different model or parameter grouping (use --init-from instead of --resume)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise NpgptError(f"optimizer state has tensors for unknown parameters, e.g. {unexpected[0]}; "
                         f"it belongs to a different model (use --init-from instead of --resume)")
    for key, s in expected.items():
        if tuple(tensors[key].shape) != s.shape:
            raise NpgptError(f"optimizer state {key} has shape {tuple(tensors[key].shape)}, the parameter "
                             f"has {s.shape}; it belongs to a different model")
    return step


# ---- Muon -----------------------------------------------------------------------------------------
# The quintic's coefficients from Keller Jordan's Muon: chosen to push small singular values up fast
# (slope a = 3.4445 at 0) rather than to converge to exactly 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# The band (documented, and checked by tests/test_muon.py): after 5 steps, every singular value s of
# G / ||G||_F with s >= NS_BAND_FLOOR lands in [NS_BAND_LO, NS_BAND_HI]; none ever exceeds NS_BAND_HI.
NS_BAND_LO, NS_BAND_HI, NS_BAND_FLOOR = 0.68, 1.21, 3e-3


def newton_schulz(G, steps: int = 5, eps: float = 1e-7):
    """Approximately orthogonalise G: with G = U S V^T, return about U V^T.  (m, n) -> (m, n), G's dtype

    X = G / ||G||_F puts every singular value in [0, 1]; each step applies the odd quintic
    p(X) = a X + b (X X^T) X + c (X X^T)^2 X, which leaves U and V alone and maps each singular
    value s to p(s) = a s + b s^3 + c s^5. Iterated, p drives every s that is not tiny into the band
    [NS_BAND_LO, NS_BAND_HI] around 1 (it is not an exact orthogonaliser: a tighter fit to 1 costs
    more steps, and Muon does not need it). The Gram matrix is taken on the short side, so the
    matmuls cost O(min(m, n)^2 max(m, n)).
    """
    xp = get_xp(G)
    a, b, c = NS_COEFFS
    X = G / (xp.linalg.norm(G) + eps)                    # Frobenius norm >= spectral norm: s <= 1
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T                                          # (short, long)
    for _ in range(steps):
        A = X @ X.T                                      # (short, short)
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X


def muon_update(p, g, buf, lr: float, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                weight_decay: float = 0.0):
    """One Muon step of one matrix, in place on p (in, out) and its momentum buffer buf (same shape).

        buf <- momentum buf + (1 - momentum) g
        u   <- (1 - momentum) g + momentum buf        (Nesterov; plain: u = buf)
        p   <- p (1 - lr wd) - lr sqrt(max(1, out / in)) newton_schulz(u)

    npgpt's Linear stores weights (in, out), so `out / in` is shape[1] / shape[0]: the scale of
    Keller Jordan's reference (rows / cols of PyTorch's (out, in) weight), which keeps the update's
    RMS per element comparable across shapes.
    """
    buf *= momentum
    buf += (1.0 - momentum) * g
    u = (1.0 - momentum) * g + momentum * buf if nesterov else buf
    o = newton_schulz(u, ns_steps)
    scale = math.sqrt(max(1.0, p.shape[1] / p.shape[0]))
    if weight_decay:
        p *= 1.0 - lr * weight_decay
    p -= (lr * scale) * o


# Names that mark a 2-D parameter as a lookup table or the output head, which Muon leaves to AdamW:
# GPT-2's wte / wpe / lm_head, Llama's embed_tokens / lm_head; LoRA's low-rank adapters too.
_ADAMW_MATRIX_NAMES = ("wte", "wpe", "embed_tokens", "lm_head", "lora_")


def muon_groups(named_params):
    """Split (name, param) pairs into (muon, adamw): the hidden matrices of the blocks -> Muon; the
    embeddings, the head, norms and biases -> AdamW. A parameter is hidden when it is 2-D and its
    name contains none of _ADAMW_MATRIX_NAMES (by shape and by name: an embedding is 2-D too)."""
    muon, adamw = [], []
    for name, p in named_params:
        hidden = p.data.ndim == 2 and not any(k in name for k in _ADAMW_MATRIX_NAMES)
        (muon if hidden else adamw).append((name, p))
    return muon, adamw


class Muon(AdamW):
    """Muon for the hidden matrices, AdamW for the rest, over one flat buffer (see the module doc).

    flat = [ Muon matrices | AdamW decayed (embeddings, head) | AdamW non-decayed (norms, biases) ]

    The AdamW part runs AdamW's own update on flat[n_muon:] (betas, eps, weight_decay, `lr`); the
    Muon part runs `muon_update` on each matrix with `muon_lr`, following the same schedule: a step
    given lr uses muon_lr * lr / self.lr. Clipping (inherited) scales all gradients by one global
    norm before either update; for the Muon matrices that changes only how much this step's gradient
    weighs in the momentum, since Newton-Schulz normalises the update's size.
    Checkpoints hold `momentum.{name}` per Muon matrix and AdamW's two moments per other parameter.
    """

    def __init__(self, named_params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, muon_lr=0.02,
                 muon_momentum=0.95, nesterov=True, ns_steps=5, muon_weight_decay=0.0):
        named = list(named_params)
        if not (muon_lr > 0 and 0.0 <= muon_momentum < 1.0 and muon_weight_decay >= 0):
            raise NpgptError(f"Muon needs muon_lr > 0, muon_momentum in [0, 1) and muon_weight_decay >= 0 "
                             f"(got {muon_lr}, {muon_momentum}, {muon_weight_decay})")
        if not (isinstance(ns_steps, int) and 1 <= ns_steps <= 20):
            raise NpgptError(f"ns_steps must be an integer in [1, 20], got {ns_steps!r}")
        muon, adamw = muon_groups(named)
        # AdamW's layout puts >= 2-D tensors first in the order given, so the Muon matrices lead.
        self.n_muon = sum(int(p.data.size) for _, p in muon)
        super().__init__(muon + adamw, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.muon_lr, self.muon_momentum = float(muon_lr), float(muon_momentum)
        self.nesterov, self.ns_steps, self.muon_weight_decay = bool(nesterov), ns_steps, float(muon_weight_decay)
        self.muon_slots, self.adam_slots = self.slots[:len(muon)], self.slots[len(muon):]
        self.momentum = self.xp.zeros(self.n_muon, dtype=self.dtype)   # (n_muon,) Muon's momentum buffers

    def _moments(self, n):
        """AdamW's moments for its part of the flat buffer only (flat[n_muon:])."""
        return super()._moments(n - self.n_muon)

    def describe(self) -> str:
        n_adam = self.flat.size - self.n_muon
        return (f"Muon: {len(self.muon_slots)} hidden matrices with {self.n_muon:,} parameters (muon_lr "
                f"{self.muon_lr:g}, momentum {self.muon_momentum:g}{', Nesterov' if self.nesterov else ''}, "
                f"{self.ns_steps} Newton-Schulz steps); AdamW: {len(self.adam_slots)} other tensors with "
                f"{n_adam:,} parameters (embeddings, head, norms, biases)")

    def muon_lr_at(self, lr: float) -> float:
        """Muon's learning rate when AdamW's is `lr`: the same schedule, scaled to muon_lr."""
        return self.muon_lr * (lr / self.lr) if self.lr > 0 else self.muon_lr

    def step(self, lr: float | None = None):
        """One Muon step of every hidden matrix, then one AdamW step (adamw_update) of the rest."""
        lr = self.lr if lr is None else float(lr)
        flat, grad, n = self.flat, self.grad, self.n_muon    # reading the buffers checks the views
        self._step_muon(self.muon_slots, lr)
        self.t += 1                                          # counted even with no AdamW parameter
        if flat.size > n:
            n_decay = min(max(self.n_decay - n, 0), flat.size - n)
            self._update(flat[n:], grad[n:], self.exp_avg, self.exp_avg_sq, n_decay, lr)

    def _step_muon(self, slots, lr):
        mlr = self.muon_lr_at(lr)
        for s in slots:
            muon_update(s.data_view, s.grad_view, self._momentum_of(s), mlr, self.muon_momentum, self.nesterov,
                        self.ns_steps, self.muon_weight_decay)

    def _momentum_of(self, s):
        """The momentum buffer of Muon matrix `s` (a view, its shape)."""
        return self.momentum[s.start:s.stop].reshape(s.shape)

    # ---------------------------------------------------------------------------- checkpoints

    def state_dict(self):
        """(tensors, meta): momentum.{name} per Muon matrix, exp_avg / exp_avg_sq.{name} per AdamW tensor."""
        buf, m, v = asnumpy(self.momentum), asnumpy(self.exp_avg), asnumpy(self.exp_avg_sq)
        tensors, off = {}, self.n_muon
        for s in self.muon_slots:
            tensors[f"momentum.{s.name}"] = np.ascontiguousarray(buf[s.start:s.stop].reshape(s.shape))
        for s in self.adam_slots:
            tensors[f"exp_avg.{s.name}"] = np.ascontiguousarray(m[s.start - off:s.stop - off].reshape(s.shape))
            tensors[f"exp_avg_sq.{s.name}"] = np.ascontiguousarray(v[s.start - off:s.stop - off].reshape(s.shape))
        meta = {"type": "Muon", "step": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "muon_lr": self.muon_lr, "muon_momentum": self.muon_momentum,
                "nesterov": self.nesterov, "ns_steps": self.ns_steps, "muon_weight_decay": self.muon_weight_decay,
                "dtype": str(self.dtype), "muon": [s.name for s in self.muon_slots],
                "adamw": [s.name for s in self.adam_slots]}
        return tensors, meta

    def load_state_dict(self, tensors: dict, meta: dict):
        """Restore momentum, moments and step from `state_dict()` output (same parameter names and shapes)."""
        if isinstance(meta, dict) and meta.get("type", "AdamW") != "Muon":
            raise NpgptError(f"the checkpoint's optimizer is {meta.get('type', 'AdamW')}, not Muon; resume with "
                             f"--set optimizer=adamw (or start a new run)")
        expected = {f"momentum.{s.name}": s for s in self.muon_slots}
        expected.update({f"{kind}.{s.name}": s for s in self.adam_slots for kind in ("exp_avg", "exp_avg_sq")})
        step = check_state(tensors, meta, expected)
        off = self.n_muon
        buf = np.empty(self.n_muon, dtype=self.dtype)
        m = np.empty(self.flat.size - off, dtype=self.dtype)
        v = np.empty(self.flat.size - off, dtype=self.dtype)
        for s in self.muon_slots:
            buf[s.start:s.stop] = np.asarray(tensors[f"momentum.{s.name}"]).reshape(-1)
        for s in self.adam_slots:
            m[s.start - off:s.stop - off] = np.asarray(tensors[f"exp_avg.{s.name}"]).reshape(-1)
            v[s.start - off:s.stop - off] = np.asarray(tensors[f"exp_avg_sq.{s.name}"]).reshape(-1)
        self.momentum[...] = self.xp.asarray(buf)
        self.exp_avg[...] = self.xp.asarray(m)
        self.exp_avg_sq[...] = self.xp.asarray(v)
        self.t = step
