"""Losses that learn from comparisons and rewards: token log-probabilities, DPO (and IPO), and the
group-relative policy gradient's loss.

Every method here scores a *response* y to a prompt x by its log-probability under the policy,

    log pi(y | x) = sum over the response's tokens t of log softmax(logits_t)[y_t]

which `token_logprobs` gives token by token (ignored positions -- the prompt, the padding -- are 0).

DPO (Rafailov et al. 2023, "Direct Preference Optimization"). A preference pair (x, y_w, y_l): the
chosen y_w was preferred to the rejected y_l. With a frozen reference model pi_ref,

    h     = beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))]
    loss  = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)          (mean over the pairs)

eps = 0 is the paper's loss; eps > 0 is conservative DPO (label smoothing: each label is taken to
be wrong with probability eps, so the loss stops pushing once the pair is clearly ordered). The
implicit reward of a response is r = beta (log pi - log pi_ref); the "margin" is r_w - r_l = h and
the pair is "right" when h > 0. Lesson 19 derives the loss from the RLHF objective.

IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences") regresses the same log-ratio difference d = h / beta onto a fixed target instead:

    loss = (d - 1 / (2 beta))^2                                        (mean over the pairs)

so it does not drive d to infinity on pairs that are always ordered the same way. (TRL's IPO
averages each response's log-probability over its tokens; here both losses use the summed
log-probability, the paper's log pi(y|x).)
"""

from __future__ import annotations

from npgpt.backend import get_xp
from npgpt.ops.reduce import softmax_array
from npgpt.tensor import Function, Tensor

DPO_LOSSES = ("sigmoid", "ipo")


# ---- log-probabilities of given tokens -------------------------------------------------------------
class TokenLogProbs(Function):
    """log softmax(logits)[target] at every position, 0 where the target is `ignore_index`.

    logits: (B, T, V) float; option targets: (B, T) int -> (B, T) float (the logits' dtype).
    """
    def forward(self, logits):
        xp = get_xp(logits)
        B, T, V = logits.shape
        t = self.targets
        if t.shape != (B, T):
            raise ValueError(f"token_logprobs: logits {logits.shape} and targets {t.shape} do not match")
        valid = t != self.ignore_index
        safe_t = xp.where(valid, t, 0)
        z = logits.reshape(-1, V)                                          # (N, V)
        probs, m, log_sum = softmax_array(z, axis=1, return_stats=True)    # (N, V), kept for backward
        picked = xp.take_along_axis(z, safe_t.reshape(-1, 1), axis=1) - m  # (N, 1) shifted target logit
        logp = (picked - log_sum)[:, 0].reshape(B, T) * valid              # (B, T)
        self.save(probs, safe_t.reshape(-1), valid.reshape(-1))
        return logp

    def backward(self, dout):
        probs, t, valid = self.saved
        B, T, V = self.logits_shape
        # forward: out = z[target] - logsumexp(z)  =>  dz = dout * (onehot(target) - softmax(z)), on valid rows
        g = (dout.reshape(-1) * valid).astype(probs.dtype)                 # (N,)
        dz = probs * (-g)[:, None]
        dz[get_xp(probs).arange(dz.shape[0]), t] += g
        return dz.reshape(B, T, V)

    @classmethod
    def apply(cls, logits, targets, ignore_index=-1):
        xp = get_xp(logits.data)
        targets = xp.asarray(targets.data if isinstance(targets, Tensor) else targets)
        return super().apply(logits, targets=targets, ignore_index=ignore_index, logits_shape=logits.shape)


def token_logprobs(logits, targets, ignore_index=-1):
    """(B, T, V) logits, (B, T) targets -> (B, T) log-probabilities of the targets (0 where ignored)."""
    return TokenLogProbs.apply(logits, targets, ignore_index=ignore_index)


def token_logprobs_reference(logits, targets, ignore_index=-1):
    """The same from primitive ops (log_softmax, a gather by indexing, a mask), for the tests."""
    xp = get_xp(logits.data)
    t = xp.asarray(targets.data if isinstance(targets, Tensor) else targets)
    B, T, V = logits.shape
    valid = t != ignore_index
    logp = logits.log_softmax(axis=-1).reshape(B * T, V)
    picked = logp[xp.arange(B * T), xp.where(valid, t, 0).reshape(-1)].reshape(B, T)
    return picked * Tensor(valid.astype(logits.dtype))


# ---- DPO and IPO -------------------------------------------------------------------------------------
def _log_sigmoid(xp, h):
    return -xp.logaddexp(0.0, -h)                       # log(1 / (1 + e^-h)), stable for any h


def _sigmoid(xp, h):
    return 0.5 * (1.0 + xp.tanh(0.5 * h))               # no overflow for large |h|


class DPOLoss(Function):
    """The mean DPO (or IPO) loss of B pairs, from the policy's summed log-probabilities.

    chosen, rejected: (B,) float Tensors, log pi(y_w|x) and log pi(y_l|x). Options: ref_chosen,
    ref_rejected (B,) arrays (constants), beta > 0, label_smoothing in [0, 0.5), loss "sigmoid"
    (DPO) or "ipo". -> scalar. See the module docstring for the formulas.
    """
    def forward(self, chosen, rejected):
        xp = get_xp(chosen)
        d = (chosen - self.ref_chosen) - (rejected - self.ref_rejected)       # (B,) log-ratio difference
        B = d.shape[0]
        if self.loss == "ipo":
            self.save(d)
            return ((d - 1.0 / (2.0 * self.beta)) ** 2).sum() / B
        h, eps = self.beta * d, self.label_smoothing
        self.save(h)
        return -((1.0 - eps) * _log_sigmoid(xp, h) + eps * _log_sigmoid(xp, -h)).sum() / B

    def backward(self, dout):
        (v,) = self.saved
        xp = get_xp(v)
        B = v.shape[0]
        if self.loss == "ipo":
            # forward: L = mean (d - 1/(2 beta))^2  =>  dL/dd = 2 (d - 1/(2 beta)) / B
            g = 2.0 * (v - 1.0 / (2.0 * self.beta)) / B
        else:
            # forward: L = mean [-(1-eps) log s(h) - eps log s(-h)], h = beta d
            #   d/dh log s(h) = s(-h), d/dh log s(-h) = -s(h)  =>  dL/dd = beta (eps s(h) - (1-eps) s(-h)) / B
            eps = self.label_smoothing
            g = self.beta * (eps * _sigmoid(xp, v) - (1.0 - eps) * _sigmoid(xp, -v)) / B
        g = (g * dout).astype(v.dtype)
        return g, -g                                     # d/d chosen = dL/dd, d/d rejected = -dL/dd

    @classmethod
    def apply(cls, chosen, rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.0, loss="sigmoid"):
        check_dpo_args(beta, label_smoothing, loss)
        xp = get_xp(chosen.data)
        dt = chosen.dtype
        ref_c = xp.asarray(ref_chosen.data if isinstance(ref_chosen, Tensor) else ref_chosen, dtype=dt)
        ref_r = xp.asarray(ref_rejected.data if isinstance(ref_rejected, Tensor) else ref_rejected, dtype=dt)
        if not (chosen.shape == rejected.shape == ref_c.shape == ref_r.shape) or len(chosen.shape) != 1:
            raise ValueError(f"dpo_loss: chosen {chosen.shape}, rejected {rejected.shape} and the references "
                             f"{ref_c.shape}, {ref_r.shape} must be the same (B,) shape")
        return super().apply(chosen, rejected, ref_chosen=ref_c, ref_rejected=ref_r, beta=float(beta),
                             label_smoothing=float(label_smoothing), loss=loss)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.0, loss="sigmoid"):
    """Mean DPO / conservative DPO / IPO loss of B pairs (see DPOLoss); gradients to the policy only."""
    return DPOLoss.apply(chosen, rejected, ref_chosen, ref_rejected, beta=beta, label_smoothing=label_smoothing,
                         loss=loss)


def dpo_loss_reference(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.0, loss="sigmoid"):
    """The same loss composed from primitive ops (sigmoid, log), for the tests."""
    d = (chosen - Tensor(ref_chosen)) - (rejected - Tensor(ref_rejected))
    if loss == "ipo":
        return ((d - 1.0 / (2.0 * beta)) ** 2).mean()
    h = d * beta
    return -(h.sigmoid().log() * (1.0 - label_smoothing) + (-h).sigmoid().log() * label_smoothing).mean()


def preference_stats(chosen, rejected, ref_chosen, ref_rejected, beta):
    """{"reward_chosen", "reward_rejected", "margin", "accuracy"}: the implicit rewards
    beta (log pi - log pi_ref) of the pairs, averaged, and the fraction with chosen > rejected."""
    xp = get_xp(chosen)
    rc, rr = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return {"reward_chosen": float(rc.mean()), "reward_rejected": float(rr.mean()),
            "margin": float((rc - rr).mean()), "accuracy": float(xp.mean(rc > rr))}


def check_dpo_args(beta, label_smoothing, loss):
    """ValueError with the reason (the config turns it into a one-line NpgptError)."""
    if not beta > 0:
        raise ValueError(f"dpo beta must be positive, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss not in DPO_LOSSES:
        raise ValueError(f"dpo loss must be one of {', '.join(DPO_LOSSES)}, got {loss!r}")


# ---- the group-relative policy gradient ---------------------------------------------------------------
def group_advantages(rewards, group_size, eps=1e-4):
    """GRPO's advantages: each reward minus its group's mean, over the group's standard deviation.

    rewards: (N,) float array, N = prompts x group_size, the G samples of one prompt adjacent ->
    (N,) float64. A group whose samples all scored the same has advantage 0 everywhere (nothing to
    learn from it); eps keeps the division finite.
    """
    xp = get_xp(rewards)
    r = xp.asarray(rewards, dtype=xp.float64).reshape(-1, group_size)         # (prompts, G)
    a = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + eps)
    return a.reshape(-1)


def policy_gradient_loss(logp, advantages, mask, ref_logp=None, kl_coef=0.0):
    """The group-relative policy-gradient loss of N sampled responses (one update per batch, so the
    importance ratio pi / pi_old is 1 and only its gradient, grad log pi, remains):

        loss = -(1/N) sum_i (1/|o_i|) sum_t [ A_i log pi(o_it) - kl_coef * k3_it ]
        k3   = exp(ref - log pi) - (ref - log pi) - 1      (Schulman's unbiased, non-negative KL estimate)

    logp: (N, T) Tensor of the policy's token log-probabilities (token_logprobs); advantages: (N,)
    array; mask: (N, T) bool, the response tokens; ref_logp: (N, T) array of the reference's, or None
    (no KL term). -> scalar Tensor.
    """
    xp = get_xp(logp.data)
    dt = logp.dtype
    m = xp.asarray(mask, dtype=dt)
    w = m / xp.maximum(m.sum(axis=1, keepdims=True), 1.0) / m.shape[0]       # (N, T): 1/|o_i| / N on o_i
    adv = xp.asarray(advantages, dtype=dt)[:, None]                           # (N, 1)
    loss = -(logp * Tensor(adv * w)).sum()
    if ref_logp is not None and kl_coef:
        diff = Tensor(xp.asarray(ref_logp, dtype=dt)) - logp                    # (N, T)
        k3 = diff.exp() - diff - 1.0
        loss = loss + (k3 * Tensor(w * kl_coef)).sum()
    return loss
