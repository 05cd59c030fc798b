"""Matrix multiplication: 2-D and batched, with NumPy's broadcasting of batch dimensions."""

from npgpt.backend import get_xp
from npgpt.ops.elementwise import unbroadcast
from npgpt.tensor import Function


class MatMul(Function):
    """a @ b.  (..., n, k) @ (..., k, m) -> (..., n, m); 1-D operands as in np.matmul."""
    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul: operands must have at least 1 dimension, got {a.shape} and {b.shape}")
        ka = a.shape[-1]
        kb = b.shape[0] if b.ndim == 1 else b.shape[-2]
        if ka != kb:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align ({ka} != {kb})")
        self.save(a, b)
        return get_xp(a, b).matmul(a, b)

    def backward(self, dout):
        a, b = self.saved
        xp = get_xp(dout)
        # Treat 1-D operands as a row (a) / a column (b) matrix, as np.matmul does.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        d = dout
        if b.ndim == 1:
            d = d[..., None]
        if a.ndim == 1:
            d = xp.expand_dims(d, -2)
        # forward: out = a @ b  =>  da = dout @ b^T, db = a^T @ dout (summed over broadcast batch dims)
        da = xp.matmul(d, xp.swapaxes(b2, -1, -2))
        db = xp.matmul(xp.swapaxes(a2, -1, -2), d)
        if a.ndim == 1:
            da = da[..., 0, :]
        if b.ndim == 1:
            db = db[..., 0]
        return unbroadcast(da, a.shape), unbroadcast(db, b.shape)
