"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

A small student learns from a big teacher's whole next-token distribution, not just the one observed
token. Both distributions are softened with a temperature T (softmax(logits / T)) so the teacher's
"dark knowledge", the relative sizes of its small probabilities, carries weight:

    distill = T^2 * mean over positions of  KL(p_T || q_T),   p_T = softmax(teacher / T),
                                                              q_T = softmax(student / T)

Why T^2: the gradient of KL(p_T || q_T) with respect to the student's logits is (q_T - p_T) / T, and
for large T the difference q_T - p_T itself shrinks like 1/T (both distributions flatten towards
uniform), so the gradient shrinks like 1/T^2. Multiplying by T^2 keeps the distillation gradient on
the same scale whatever T, so mixing it with the ordinary loss needs no retuning when T changes.

    mixed = alpha * distill + (1 - alpha) * cross_entropy(student, targets)    (alpha = 0.5 default)

The teacher's logits are constants here: no gradient flows to the teacher (run it under no_grad).
"""

from __future__ import annotations

from npgpt.backend import get_xp
from npgpt.errors import NpgptError
from npgpt.ops.nn import cross_entropy
from npgpt.ops.reduce import log_softmax_array
from npgpt.tensor import Function, Tensor


class DistillKL(Function):
    """T^2 * mean_valid KL(softmax(teacher/T) || softmax(student/T)).

    student: (..., V) float -> scalar. Options: teacher (..., V) array (no gradient), temperature T > 0,
    ignore (...) bool array or None (True = position does not count). All ignored -> 0, zero gradient.
    """
    def forward(self, student):
        xp = get_xp(student)
        T = self.temperature
        V = student.shape[-1]
        s = student.reshape(-1, V) / T                        # (N, V)
        t = self.teacher.reshape(-1, V).astype(student.dtype) / T
        log_q = log_softmax_array(s, axis=1, out=s)           # s is our own temporary
        log_p = log_softmax_array(t, axis=1, out=t)           # so is t (a new array, / T)
        p = xp.exp(log_p)
        kl = (p * (log_p - log_q)).sum(axis=1)                # (N,)
        valid = xp.ones(kl.shape, dtype=bool) if self.ignore is None else ~self.ignore.reshape(-1)
        n = xp.maximum(valid.sum(), 1).astype(student.dtype)  # 1 when all are ignored: loss 0, not NaN
        self.save(p, log_q, valid, n)
        return (T * T) * (kl * valid).sum() / n

    def backward(self, dout):
        p, log_q, valid, n = self.saved
        xp = get_xp(p)
        T = self.temperature
        # forward: L = T^2 / n * sum_valid sum_v p (log p - log_softmax(z / T))
        #   =>  dL/dz = T^2 / n * (q - p) / T = T * (q - p) / n   on valid rows
        scale = dout * (T / n)
        dz = (xp.exp(log_q) - p) * (scale * valid)[:, None]
        return dz.reshape(self.student_shape)

    @classmethod
    def apply(cls, student, teacher, temperature=2.0, ignore=None):
        xp = get_xp(student.data)
        teacher = teacher.data if isinstance(teacher, Tensor) else xp.asarray(teacher)
        if tuple(teacher.shape) != tuple(student.shape):
            raise ValueError(f"distill_loss: student logits {student.shape} and teacher logits "
                             f"{teacher.shape} must have the same shape")
        if not temperature > 0:
            raise ValueError(f"distill_loss: temperature must be positive, got {temperature}")
        if ignore is not None:
            ignore = xp.asarray(ignore.data if isinstance(ignore, Tensor) else ignore, dtype=bool)
        return super().apply(student, teacher=teacher, temperature=float(temperature), ignore=ignore,
                             student_shape=student.shape)


def distill_loss(student_logits, teacher_logits, temperature=2.0, ignore_mask=None):
    """T^2 * mean KL(softmax(teacher/T) || softmax(student/T)); gradient to the student only.

    student_logits: (..., V) Tensor; teacher_logits: (..., V) Tensor or array; ignore_mask: (...) bool,
    True where a position should not count (e.g. padding, targets == ignore_index).
    """
    return DistillKL.apply(student_logits, teacher_logits, temperature=temperature, ignore=ignore_mask)


def distill_loss_reference(student_logits, teacher_logits, temperature=2.0):
    """The same loss (no mask) composed from primitive ops, for the tests."""
    T = temperature
    t = teacher_logits.data if isinstance(teacher_logits, Tensor) else teacher_logits
    xp = get_xp(t)
    log_p = Tensor(t / T).log_softmax(axis=-1).data
    log_q = (student_logits * (1.0 / T)).log_softmax(axis=-1)
    kl = (Tensor(xp.exp(log_p)) * (Tensor(log_p) - log_q)).sum(axis=-1)
    return kl.mean() * (T * T)


def mixed_loss(student_logits, teacher_logits, targets, alpha=0.5, temperature=2.0, ignore_index=-1):
    """alpha * distill_loss + (1 - alpha) * cross_entropy(student, targets), over the same positions.

    alpha = 1 learns from the teacher alone, alpha = 0 is ordinary training; positions whose target
    is ignore_index count in neither term.
    """
    check_distill_args(alpha, temperature)
    xp = get_xp(student_logits.data)
    targets = xp.asarray(targets.data if isinstance(targets, Tensor) else targets)
    ce = cross_entropy(student_logits, targets, ignore_index=ignore_index)
    if alpha == 0:
        return ce
    kd = distill_loss(student_logits, teacher_logits, temperature, ignore_mask=targets == ignore_index)
    return kd if alpha == 1 else kd * alpha + ce * (1.0 - alpha)


def check_distill_args(alpha, temperature):
    """Validate --distill-alpha and --distill-temperature (NpgptError with a one-line reason)."""
    if not 0 <= alpha <= 1:
        raise NpgptError(f"--distill-alpha must be in [0, 1] (the weight of the teacher's loss), got {alpha}")
    if not temperature > 0:
        raise NpgptError(f"--distill-temperature must be positive, got {temperature}")
