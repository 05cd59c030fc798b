"""The autograd engine: graph order, reuse, deep chains, no_grad/detach, freed graphs, errors."""

import numpy as np
import pytest

import npgpt.ops as F
from npgpt import Tensor, gradcheck, no_grad


def leaf(a, dtype=np.float64):
    return Tensor(np.asarray(a, dtype=dtype), requires_grad=True)


def test_diamond_graph():
    # y = a*b + a*c with a reaching the output along two paths
    a, b, c = leaf(2.0), leaf(3.0), leaf(5.0)
    (a * b + a * c).backward()
    assert a.grad == 8.0 and b.grad == 2.0 and c.grad == 2.0


def test_tensor_reused_many_times():
    x = leaf(np.array([1.0, 2.0]))
    y = x
    for _ in range(50):
        y = y + x
    y.backward(np.ones(2))
    np.testing.assert_array_equal(x.grad, [51.0, 51.0])


def test_chain_of_10000_ops_has_no_recursion_limit():
    x = leaf(1.0)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.backward()
    np.testing.assert_allclose(x.grad, 1.0001 ** 10_000, rtol=1e-9)


def test_gradients_accumulate_across_backward_calls():
    x = leaf([1.0, 2.0])
    (x * 3.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [6.0, 6.0])


def test_no_grad_builds_no_graph():
    x = leaf([1.0])
    with no_grad():
        y = x * 2.0
    assert not y.requires_grad and y._ctx is None
    z = x * 2.0
    assert z.requires_grad


def test_no_grad_as_decorator():
    @no_grad()
    def f(t):
        return t * 2.0
    assert not f(leaf([1.0])).requires_grad


def test_detach_stops_gradients():
    x = leaf([1.0, 2.0])
    y = (x * 2.0).detach()
    z = (x * y).sum()
    z.backward()
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])   # y treated as a constant


def test_backward_on_non_scalar_needs_gradient():
    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match="non-scalar tensor of shape \\(2,\\) needs an explicit gradient"):
        (x * 2.0).backward()


def test_backward_twice_through_freed_graph_raises():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="freed graph"):
        y.backward()


def test_retain_graph_allows_second_backward():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_array_equal(x.grad, [4.0, 8.0])


def test_backward_without_requires_grad_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(2)).sum().backward()


def test_graph_is_freed_after_backward():
    x = leaf([1.0, 2.0])
    h = x * 2.0
    y = h.sum()
    y.backward()
    assert h._ctx.saved is None and y._ctx.saved is None


def test_retain_grad_on_intermediate():
    x = leaf([1.0, 2.0])
    h = (x * 2.0).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_array_equal(h.grad, [4.0, 8.0])


@pytest.mark.parametrize("fn", [
    lambda x: x * 2.5 + 1, lambda x: 1 - x / 3, lambda x: (x ** 2).mean(), lambda x: x.exp().log(),
    lambda x: x.softmax(), lambda x: x.log_softmax(), lambda x: x.var(axis=0), lambda x: x.sigmoid(),
    lambda x: F.where(np.ones((2, 3), bool), x, 0.0), lambda x: x.tanh().sqrt(), lambda x: x.clip(0.1, 0.5),
    lambda x: x @ x.T, lambda x: x.max(axis=1),
])
def test_float32_stays_float32(fn):
    x = Tensor(np.random.default_rng(0).uniform(0.5, 1.0, (2, 3)).astype(np.float32), requires_grad=True)
    y = fn(x)
    assert y.dtype == np.float32
    y.backward(np.ones(y.shape, np.float32))
    assert x.grad.dtype == np.float32


def test_ndarray_on_the_left_defers_to_tensor():
    x = leaf([1.0, 2.0])
    y = np.array([3.0, 4.0]) * x
    assert isinstance(y, Tensor)
    y.backward(np.ones(2))
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


@pytest.mark.parametrize("expr, op", [
    (lambda a, b: a + b, "add"), (lambda a, b: a - b, "sub"), (lambda a, b: a * b, "mul"),
    (lambda a, b: a / b, "div"), (lambda a, b: a @ b, "matmul"),
])
def test_shape_mismatch_names_op_and_shapes(expr, op):
    a, b = Tensor(np.ones((2, 3))), Tensor(np.ones((4, 5)))
    with pytest.raises(ValueError, match=rf"{op}: shapes \(2, 3\) and \(4, 5\)"):
        expr(a, b)


def test_reshape_and_concatenate_errors_name_op():
    with pytest.raises(ValueError, match=r"reshape: cannot reshape an array of shape \(2, 3\) into \(4,\)"):
        Tensor(np.ones((2, 3))).reshape(4)
    with pytest.raises(ValueError, match="concatenate"):
        F.concatenate([Tensor(np.ones((2, 3))), Tensor(np.ones((2, 4)))], axis=0)


def test_gradcheck_reports_a_wrong_backward():
    from npgpt.tensor import Function

    class BadSquare(Function):
        def forward(self, x):
            self.save(x)
            return x * x

        def backward(self, dout):
            (x,) = self.saved
            return dout * x      # wrong: should be 2 x dout

    result = gradcheck(lambda t: BadSquare.apply(t), np.array([1.0, 2.0, 3.0]))
    assert not result.ok and result.errors[0] > 0.4
    assert "FAILED" in str(result)


def test_gradcheck_passes_integer_inputs_through():
    ids = np.array([0, 2, 2])
    result = gradcheck(lambda w, i: w[i] * 2.0, np.arange(6.0).reshape(3, 2), ids)
    assert result.ok and result.errors[1] is None
