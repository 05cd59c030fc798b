"""Shape primitives: reshape, transpose, indexing, concatenate, stack.

None of these does arithmetic; their backward routes gradient elements back to where they came
from. Indexing with integer arrays may pick an element twice, so its backward scatter-adds
(`xp.add.at`), which plain `dx[idx] += g` would get wrong.
"""

from npgpt.backend import get_xp
from npgpt.tensor import Function


class Reshape(Function):
    """x viewed with a new `shape`."""
    def forward(self, x):
        self.in_shape = x.shape
        try:
            return x.reshape(self.shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape an array of shape {x.shape} into {tuple(self.shape)}") from None

    def backward(self, dout):
        return dout.reshape(self.in_shape)


class Transpose(Function):
    """Permute axes (`axes`=None reverses them, as np.transpose)."""
    def forward(self, x):
        axes = tuple(range(x.ndim))[::-1] if self.axes is None else tuple(a % x.ndim for a in self.axes)
        if sorted(axes) != list(range(x.ndim)):
            raise ValueError(f"transpose: axes {self.axes} are not a permutation for shape {x.shape}")
        self.axes = axes
        return x.transpose(axes)

    def backward(self, dout):
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a] = i
        return dout.transpose(inverse)


def _is_advanced(index):
    """True if the index uses integer/boolean arrays (NumPy 'advanced' indexing)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(not isinstance(p, (int, slice, type(None), type(Ellipsis))) for p in parts)


class GetItem(Function):
    """x[index]: basic slicing or integer-array indexing (option `index`)."""
    def forward(self, x):
        self.in_shape, self.dtype = x.shape, x.dtype
        return x[self.index]

    def backward(self, dout):
        xp = get_xp(dout)
        dx = xp.zeros(self.in_shape, dtype=dout.dtype)
        if _is_advanced(self.index):
            xp.add.at(dx, self.index, dout)   # repeated indices must add up
        else:
            dx[self.index] = dout             # a basic slice touches each element at most once
        return dx


class Concatenate(Function):
    """Join arrays along `axis`."""
    def forward(self, *xs):
        xp = get_xp(*xs)
        try:
            out = xp.concatenate(xs, axis=self.axis)
        except ValueError:
            raise ValueError(f"concatenate: shapes {[x.shape for x in xs]} do not match "
                             f"outside axis {self.axis}") from None
        self.sizes = [x.shape[self.axis] for x in xs]
        return out

    def backward(self, dout):
        xp = get_xp(dout)
        cuts = list(xp.cumsum(xp.asarray(self.sizes[:-1]))) if len(self.sizes) > 1 else []
        return tuple(xp.split(dout, [int(c) for c in cuts], axis=self.axis))


class Stack(Function):
    """Stack equally shaped arrays along a new `axis`."""
    def forward(self, *xs):
        xp = get_xp(*xs)
        if len({x.shape for x in xs}) > 1:
            raise ValueError(f"stack: all shapes must be equal, got {[x.shape for x in xs]}")
        self.n = len(xs)
        return xp.stack(xs, axis=self.axis)

    def backward(self, dout):
        xp = get_xp(dout)
        return tuple(xp.take(dout, i, axis=self.axis) for i in range(self.n))
