"""Property tests: every primitive op's gradient equals central differences (float64), and its
forward equals plain NumPy, over random shapes (broadcasting, size-1 dims, 0-d), values and
upstream gradients."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npgpt.ops as F
from npgpt import Tensor, gradcheck

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4)
seeds = st.integers(0, 2**32 - 1)


def values(seed, shape, lo=-2.0, hi=2.0, away_from=None, gap=0.1):
    """Random float64 values in [lo, hi], kept at least `gap` away from the kink points."""
    r = np.random.default_rng(seed)
    x = r.uniform(lo, hi, size=shape)
    for k in away_from or ():
        near = np.abs(x - k) < gap
        x = np.where(near, k + np.sign(x - k + 1e-12) * gap * (1 + r.uniform(size=shape)), x)
    return x


def check(fn, ref, *arrays, tol=1e-6):
    """Forward equals the NumPy reference; gradients equal finite differences."""
    out = fn(*[Tensor(a) for a in arrays])
    np.testing.assert_allclose(out.data, ref(*arrays), rtol=1e-12, atol=1e-12)
    assert out.dtype == np.float64
    result = gradcheck(fn, *arrays, tol=tol)
    assert result.ok, str(result)


# ---- binary elementwise ops with broadcasting ---------------------------------------------------
@given(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=4), seeds,
       st.sampled_from(["add", "sub", "mul", "div"]))
def test_binary_ops(bshapes, seed, op):
    (sa, sb), _ = bshapes
    a = values(seed, sa)
    b = values(seed + 1, sb, away_from=[0.0], gap=0.5) if op == "div" else values(seed + 1, sb)
    fns = {"add": (lambda x, y: x + y, np.add), "sub": (lambda x, y: x - y, np.subtract),
           "mul": (lambda x, y: x * y, np.multiply), "div": (lambda x, y: x / y, np.divide)}
    fn, ref = fns[op]
    check(fn, ref, a, b)


@given(shapes, seeds, st.floats(-3, 3))
def test_ops_with_python_scalars(shape, seed, c):
    a = values(seed, shape)
    check(lambda x: 2.5 * x - c, lambda x: 2.5 * x - c, a)
    check(lambda x: 1.5 / (x * x + 1.0) + c, lambda x: 1.5 / (x * x + 1.0) + c, a)


# ---- unary ops ----------------------------------------------------------------------------------
UNARY = {
    "neg": (lambda x: -x, np.negative, {}),
    "exp": (lambda x: x.exp(), np.exp, {}),
    "log": (lambda x: x.log(), np.log, {"lo": 0.2, "hi": 3.0}),
    "sqrt": (lambda x: x.sqrt(), np.sqrt, {"lo": 0.2, "hi": 3.0}),
    "tanh": (lambda x: x.tanh(), np.tanh, {}),
    "relu": (lambda x: x.relu(), lambda x: np.maximum(x, 0), {"away_from": [0.0]}),
    "sigmoid": (lambda x: x.sigmoid(), lambda x: 1 / (1 + np.exp(-x)), {}),
    "clip": (lambda x: x.clip(-0.5, 1.0), lambda x: np.clip(x, -0.5, 1.0), {"away_from": [-0.5, 1.0]}),
    "pow2": (lambda x: x ** 2, lambda x: x ** 2, {}),
    "pow3": (lambda x: x ** 3, lambda x: x ** 3, {}),
    "pow_frac": (lambda x: x ** 1.5, lambda x: x ** 1.5, {"lo": 0.2, "hi": 3.0}),
    "pow_neg": (lambda x: x ** -0.5, lambda x: x ** -0.5, {"lo": 0.2, "hi": 3.0}),
}


@pytest.mark.parametrize("op", sorted(UNARY))
@given(shape=shapes, seed=seeds)
def test_unary_ops(op, shape, seed):
    fn, ref, kw = UNARY[op]
    check(fn, ref, values(seed, shape, **kw))


# ---- matmul -------------------------------------------------------------------------------------
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4),
       hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3), seeds)
def test_matmul_batched_broadcast(n, k, m, batch, seed):
    (ba, bb), _ = batch
    a, b = values(seed, ba + (n, k)), values(seed + 1, bb + (k, m))
    check(lambda x, y: x @ y, np.matmul, a, b)


@given(st.integers(1, 4), st.integers(1, 4), seeds, st.sampled_from(["vec@mat", "mat@vec", "vec@vec", "bmat@vec"]))
def test_matmul_1d(k, m, seed, case):
    shapes_for = {"vec@mat": ((k,), (k, m)), "mat@vec": ((m, k), (k,)), "vec@vec": ((k,), (k,)),
                  "bmat@vec": ((2, m, k), (k,))}
    sa, sb = shapes_for[case]
    check(lambda x, y: x @ y, np.matmul, values(seed, sa), values(seed + 1, sb))


# ---- reductions ---------------------------------------------------------------------------------
@st.composite
def shape_and_axis(draw, min_dims=0):
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=4, min_side=1, max_side=4))
    if len(shape) == 0:
        return shape, None
    axis = draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1),
                          st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True).map(tuple)))
    return shape, axis


@pytest.mark.parametrize("op", ["sum", "mean", "max", "var"])
@given(sa=shape_and_axis(), keepdims=st.booleans(), seed=seeds)
def test_reductions(op, sa, keepdims, seed):
    shape, axis = sa
    a = values(seed, shape)
    check(lambda x: getattr(x, op)(axis=axis, keepdims=keepdims),
          lambda x: getattr(np, op)(x, axis=axis, keepdims=keepdims), a)


@given(sa=shape_and_axis(min_dims=1), seed=seeds)
def test_var_ddof1(sa, seed):
    shape, axis = sa
    a = values(seed, shape)
    n = a.size if axis is None else int(np.prod([shape[i] for i in np.atleast_1d(axis)]))
    if n < 2:
        return
    check(lambda x: x.var(axis=axis, ddof=1), lambda x: np.var(x, axis=axis, ddof=1), a)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=5), seed=seeds, data=st.data())
def test_softmax_family(op, shape, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    a = values(seed, shape, -4, 4)

    def ref(x):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        s = e / e.sum(axis=axis, keepdims=True)
        return s if op == "softmax" else np.log(s)
    check(lambda x: getattr(F, op)(x, axis=axis), ref, a)


# ---- shape ops ----------------------------------------------------------------------------------
@given(shape=shapes, seed=seeds, data=st.data())
def test_reshape(shape, seed, data):
    a = values(seed, shape)
    new = data.draw(st.permutations(list(shape) + [1])).copy()
    check(lambda x: x.reshape(new), lambda x: x.reshape(new), a)
    check(lambda x: x.reshape(-1), lambda x: x.reshape(-1), a)


@given(shape=shapes, seed=seeds, data=st.data())
def test_transpose_permute(shape, seed, data):
    a = values(seed, shape)
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    check(lambda x: x.permute(perm), lambda x: x.transpose(perm), a)
    check(lambda x: x.transpose(), lambda x: x.transpose(), a)
    check(lambda x: x.T, lambda x: x.T, a)


@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), seed=seeds, data=st.data())
def test_basic_indexing(shape, seed, data):
    a = values(seed, shape)
    index = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True))
    check(lambda x: x[index], lambda x: x[index], a)


@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), seed=seeds, data=st.data())
def test_integer_array_indexing_with_repeats(shape, seed, data):
    a = values(seed, shape)
    idx = np.array(data.draw(st.lists(st.integers(-shape[0], shape[0] - 1), min_size=1, max_size=8)))
    check(lambda x: x[idx], lambda x: x[idx], a)
    if len(shape) >= 2:
        idx2 = np.array(data.draw(st.lists(st.integers(0, shape[1] - 1), min_size=len(idx), max_size=len(idx))))
        check(lambda x: x[idx, idx2], lambda x: x[idx, idx2], a)


def test_repeated_index_gradient_adds_up():
    x = Tensor(np.arange(3.0), requires_grad=True)
    x[np.array([0, 0, 2, 0])].backward(np.ones(4))
    np.testing.assert_array_equal(x.grad, [3.0, 0.0, 1.0])


@given(base=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds, data=st.data())
def test_concatenate_stack_split(base, seed, data):
    axis = data.draw(st.integers(0, len(base) - 1))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    arrays = [values(seed + i, base[:axis] + (n,) + base[axis + 1:]) for i, n in enumerate(sizes)]
    check(lambda *xs: F.concatenate(xs, axis=axis), lambda *xs: np.concatenate(xs, axis=axis), *arrays)
    same = [values(seed + i, base) for i in range(len(sizes))]
    check(lambda *xs: F.stack(xs, axis=axis), lambda *xs: np.stack(xs, axis=axis), *same)
    joined = np.concatenate(arrays, axis=axis)
    cuts = list(np.cumsum(sizes)[:-1])
    for piece in range(len(sizes)):
        check(lambda x: F.split(x, cuts, axis=axis)[piece], lambda x: np.split(x, cuts, axis=axis)[piece], joined)


@given(bshapes=hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=4), seed=seeds)
def test_where_and_masked_fill(bshapes, seed):
    (sc, sa, sb), _ = bshapes
    cond = np.random.default_rng(seed).random(sc) < 0.5
    a, b = values(seed, sa), values(seed + 1, sb)
    check(lambda x, y: F.where(cond, x, y), lambda x, y: np.where(cond, x, y), a, b)
    out_shape = np.broadcast_shapes(sc, sa)
    check(lambda x: F.masked_fill(x, cond, -3.0), lambda x: np.where(cond, -3.0, np.broadcast_to(x, out_shape)), a)
