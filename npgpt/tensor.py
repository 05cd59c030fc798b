"""Tensor, Function and the reverse-mode autograd engine.

A `Tensor` wraps one NumPy or CuPy array (`data`) and, after `backward()`, its gradient (`grad`, a
plain array of the same shape). Every differentiable operation is a `Function` subclass with
`forward` (arrays in, array out) directly above `backward` (upstream gradient in, one gradient per
input out). Calling `SomeFunction.apply(*tensors, **options)` runs `forward` and, when gradients
are wanted, records the function as the output's creator (`_ctx`), building the graph.

`loss.backward()` sorts the graph topologically with an explicit stack (no recursion, so a chain
of 10,000 ops is fine), then walks it once in reverse, handing each function the gradient of its
output and summing gradients that reach a tensor along several paths. Afterwards the graph is freed
(saved arrays and links dropped) unless `retain_graph=True`.

Gradients of leaf tensors accumulate: `grad` is set on the first backward and added to in place
afterwards. The optimizer relies on this: it points every parameter's `grad` at a slice of one
flat buffer, so gradients land straight in the buffer the update reads.
"""

from __future__ import annotations

import contextvars

from npgpt.backend import asnumpy, device_of, get_xp, to_device

# The engine's two knobs are context variables, not module globals (as Chainer keeps its config
# thread-local): a `with no_grad():` or `with profiling(...)` block changes them for the code inside
# it, in this thread (or asyncio task) only. A server's engine thread or a training replica never
# sees another thread's block; threads npgpt starts itself run in a copy of the starting thread's
# context (`contextvars.copy_context().run`), so they do see the mode their caller was in.
GRAD_ENABLED = contextvars.ContextVar("npgpt_grad_enabled", default=True)

# The op profiler (see `profiling`): None except while `npgpt bench --profile` measures. When it is
# None, apply() and backward() pay one context-variable read per op for it and nothing more.
PROFILER = contextvars.ContextVar("npgpt_profiler", default=None)


class _ContextSetting:
    """A context manager that sets one ContextVar for the block and restores it on exit (nestable,
    and the same object may be entered again: tokens are kept on a stack)."""

    var: contextvars.ContextVar

    def _value(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self):
        self.__dict__.setdefault("_tokens", []).append(self.var.set(self._value()))
        return self._value()

    def __exit__(self, *exc):
        self.var.reset(self._tokens.pop())


class profiling(_ContextSetting):
    """Context manager that times every Function's forward and backward.

    `profiler` has `clock()` (a time in seconds; on the GPU it synchronises first, so an op's
    time is not hidden in the next one) and `record(fn, phase, seconds)` with phase "forward" or
    "backward". npgpt.bench groups the records into op kinds.
    """

    var = PROFILER

    def __init__(self, profiler):
        self.profiler = profiler

    def _value(self):
        return self.profiler


class no_grad(_ContextSetting):
    """Context manager (and decorator) that disables graph building, e.g. for evaluation."""

    var = GRAD_ENABLED

    def _value(self):
        return False

    def __enter__(self):
        super().__enter__()

    def __call__(self, fn):
        def wrapper(*args, **kwargs):
            with no_grad():
                return fn(*args, **kwargs)

        wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
        return wrapper


def is_grad_enabled() -> bool:
    return GRAD_ENABLED.get()


class Function:
    """One differentiable operation. Subclasses define `forward(*arrays)` and `backward(dout)`.

    Options (axis, eps, an index, ...) are passed as keywords to `apply` and become attributes.
    `forward` calls `self.save(...)` with exactly what `backward` reads; `backward` returns one
    gradient (or None) per tensor input, each with that input's shape.
    """

    def __init__(self, **options):
        self.__dict__.update(options)
        self.saved = ()
        self.inputs = None           # the input Tensors, set only when a graph is recorded
        self.requires_grad = False   # whether backward will run (forward may skip saving)

    def save(self, *arrays):
        if self.requires_grad:
            self.saved = arrays

    @classmethod
    def apply(cls, *inputs, **options):
        fn = cls(**options)
        tensors = tuple(x if isinstance(x, Tensor) else Tensor(x) for x in inputs)
        fn.requires_grad = GRAD_ENABLED.get() and any(t.requires_grad for t in tensors)
        profiler = PROFILER.get()
        if profiler is None:
            data = fn.forward(*(t.data for t in tensors))
        else:
            start = profiler.clock()
            data = fn.forward(*(t.data for t in tensors))
            profiler.record(fn, "forward", profiler.clock() - start)
        out = Tensor(data, requires_grad=fn.requires_grad)
        if fn.requires_grad:
            fn.inputs = tensors
            out._ctx = fn
        return out

    @property
    def name(self):
        return type(self).__name__

    def forward(self, *arrays):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dout):  # pragma: no cover - abstract
        raise NotImplementedError


class Tensor:
    """An array (NumPy or CuPy) with an optional gradient and a link to the op that made it."""

    # Make `ndarray + Tensor` defer to Tensor.__radd__ instead of NumPy broadcasting over objects.
    __array_priority__ = 1000

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.data
        xp = get_xp(data)
        if not isinstance(data, xp.ndarray):
            data = xp.asarray(data)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None             # the Function that produced this tensor (None for leaves)
        self._retain_grad = False

    # ---- array-like attributes ---------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: device_of(self.data))
    is_leaf = property(lambda self: self._ctx is None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        # grad_fn names the Function that made this tensor (PyTorch's spelling): the graph's edge.
        if self._ctx is not None:
            flag = f", grad_fn=<{self._ctx.name}>"
        else:
            flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({asnumpy(self.data)!r}{flag})"

    @property
    def grad_fn(self):
        """The Function that produced this tensor (None for leaves and under no_grad)."""
        return self._ctx

    def numpy(self):
        """The data as a NumPy array (a device->host copy on the GPU)."""
        return asnumpy(self.data)

    def item(self):
        return self.data.item()

    def __float__(self):
        return float(self.data)

    def to(self, device):
        """A copy of this tensor on `device` (a new leaf; the graph is not carried over)."""
        return Tensor(to_device(self.data, device), requires_grad=self.requires_grad)

    def detach(self):
        """The same data, cut from the graph: gradients stop here."""
        return Tensor(self.data)

    def retain_grad(self):
        """Keep `grad` on this non-leaf tensor after backward (for inspection)."""
        self._retain_grad = True
        return self

    def zero_grad(self):
        self.grad = None

    # ---- the engine --------------------------------------------------------------------------
    def backward(self, grad=None, retain_graph=False):
        """Fill `.grad` of every leaf that requires grad with d(self)/d(leaf), contracted with `grad`.

        `grad` defaults to 1 for a one-element tensor; a larger tensor needs an explicit upstream
        gradient of its own shape.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input "
                               "had requires_grad=True (or it was made under no_grad())")
        xp = get_xp(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() on a non-scalar tensor of shape {self.shape} needs an "
                                   f"explicit gradient: call t.backward(grad) with an array of that shape")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(): gradient shape {grad.shape} != tensor shape {self.shape}")

        order = _topological_order(self)
        profiler = PROFILER.get()
        grads = {id(self): grad}
        for t in reversed(order):           # outputs before the inputs they were made from
            g = grads.pop(id(t), None)
            if g is None:
                continue
            fn = t._ctx
            if fn is None or t._retain_grad:
                _accumulate(t, g)
            if fn is None:
                continue
            if profiler is None:
                in_grads = fn.backward(g)
            else:
                start = profiler.clock()
                in_grads = fn.backward(g)
                profiler.record(fn, "backward", profiler.clock() - start)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            for parent, pg in zip(fn.inputs, in_grads):
                if pg is None or not parent.requires_grad:
                    continue
                if pg.shape != parent.shape:
                    raise RuntimeError(f"{fn.name}.backward returned a gradient of shape {pg.shape} "
                                       f"for an input of shape {parent.shape}")
                key = id(parent)
                # out of place: one op may hand the same array to two parents
                grads[key] = grads[key] + pg if key in grads else pg
            if not retain_graph:
                fn.inputs, fn.saved = (), None   # free the graph; `()` marks it as freed

    # Operators and methods (`a + b`, `a @ b`, `a.sum()`, `a.reshape()`, ...) are bound onto this
    # class by npgpt/ops/__init__.py, next to the Functions that implement them.


def _topological_order(root):
    """Tensors reachable from `root` through recorded ops, each after all of its inputs."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            order.append(t)
            continue
        if id(t) in visited:
            continue
        visited.add(id(t))
        stack.append((t, True))
        fn = t._ctx
        if fn is not None:
            if fn.saved is None:
                raise RuntimeError(f"backward through a freed graph ({fn.name}): the graph is freed after "
                                   f"the first backward; pass retain_graph=True to keep it")
            for p in fn.inputs:
                if p.requires_grad and id(p) not in visited:
                    stack.append((p, False))
    return order


def _accumulate(t, g):
    """Add gradient g into t.grad: in place when a buffer exists (e.g. the optimizer's flat one)."""
    if t.grad is None:
        t.grad = g.astype(t.dtype, copy=True)   # own copy: g may be shared with other tensors
    else:
        t.grad += g


def as_tensor(x, like=None):
    """A Tensor from x; Python numbers take the dtype (and device) of `like` (no float64 promotion)."""
    if isinstance(x, Tensor):
        return x
    if like is not None and isinstance(x, (int, float, bool)):
        xp = get_xp(like.data)
        return Tensor(xp.asarray(x, dtype=like.dtype))
    return Tensor(x)

