"""Lesson 19: learning from preferences (DPO) and from rewards (the policy gradient with a baseline).

    python examples/learn/19_preferences_and_rewards.py [--fast] [--out pictures/]

After SFT a model imitates; the next step is to tell it which of its answers are better. Two ways,
both in npgpt (`npgpt finetune --dpo`, `npgpt finetune --rl`), both derived here on a toy "model"
whose whole output is one of K answers y to a fixed prompt x, pi(y) = softmax(theta)_y, so every
sum over answers can be done exactly and every claim checked numerically.

1. The RLHF objective. Given a reward r(y) and a reference policy pi_ref (the SFT model), find

       max_pi  E_{y ~ pi}[r(y)] - beta KL(pi || pi_ref)

   (more reward, but do not wander far from what the SFT model says). It has a closed form: for
   sum_y pi(y) = 1, set the derivative of sum_y pi (r - beta log(pi / pi_ref)) + lambda (sum pi - 1)
   to zero: r - beta log(pi/pi_ref) - beta + lambda = 0, so

       pi*(y) = pi_ref(y) exp(r(y) / beta) / Z,        Z = sum_y pi_ref(y) exp(r(y) / beta)

   and the best value is beta log Z. Check: no other distribution scores higher.
2. The implicit reward. Take logs and solve for r:

       r(y) = beta log(pi*(y) / pi_ref(y)) + beta log Z

   Any policy defines a reward this way, up to beta log Z -- a constant of the prompt that is hard
   to compute (a sum over every possible answer). But people compare two answers to the same
   prompt (Bradley-Terry: P(y_w beats y_l) = sigmoid(r(y_w) - r(y_l))), and in a difference
   beta log Z cancels:

       P(y_w beats y_l) = sigmoid(beta log(pi(y_w)/pi_ref(y_w)) - beta log(pi(y_l)/pi_ref(y_l)))

   Maximising the likelihood of the observed preferences over pi directly is DPO (Rafailov et al.
   2023): no reward model, no sampling, one loss,

       loss = -log sigmoid(beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

   Check: minimising its expectation over Bradley-Terry labels of every pair lands on pi*, the
   RLHF optimum, using npgpt's own `dpo_loss` (label smoothing eps = the chance the label is
   flipped: the expected loss over noisy labels IS conservative DPO).
3. The policy gradient. With a checker instead of preferences (is 23+45=68?), maximise
   J(theta) = E_{y~pi}[R(y)] by sampling. The gradient moves inside the expectation via
   grad pi = pi grad log pi:

       grad J = sum_y R(y) grad pi(y) = E_{y~pi}[R(y) grad log pi(y)]          (REINFORCE)

   and any baseline b that does not depend on the sampled y can be subtracted, because
   E[grad log pi] = sum_y grad pi(y) = grad 1 = 0:

       grad J = E[(R(y) - b) grad log pi(y)]

   Same mean, much less noise when b is near the typical reward. GRPO (`npgpt finetune --rl`)
   samples G answers per prompt and uses their mean as b (and divides by their std). Checks: the
   estimates with and without a baseline both average to the exact gradient; the baseline cuts
   the variance; the group mean (which includes the sample itself) is the unbiased leave-one-out
   baseline scaled by (G - 1) / G -- the same direction.
4. A bandit learns: npgpt's `policy_gradient_loss` (the loss `finetune --rl` uses) raises the
   expected reward of the toy policy from sampled groups alone.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, have_matplotlib, parse, title  # noqa: E402

from npgpt import Tensor  # noqa: E402
from npgpt.ops.preference import dpo_loss, group_advantages, policy_gradient_loss  # noqa: E402
from npgpt.viz import save_figure  # noqa: E402


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def objective(pi, r, pi_ref, beta):
    """E_pi[r] - beta KL(pi || pi_ref)."""
    return float(pi @ r - beta * np.sum(pi * np.log(pi / pi_ref)))


def main(argv=None):
    args = parse(argv, __doc__)
    rng = np.random.default_rng(0)
    K, beta = 6, 0.5
    r = rng.normal(0, 1, K)                                  # the (hidden) reward of each answer
    pi_ref = softmax(rng.normal(0, 1, K))                    # the SFT model

    title("1. the RLHF objective has a closed-form optimum")
    Z = pi_ref @ np.exp(r / beta)
    pi_star = pi_ref * np.exp(r / beta) / Z
    best = objective(pi_star, r, pi_ref, beta)
    others = [objective(softmax(np.log(pi_star) + rng.normal(0, s, K)), r, pi_ref, beta)
              for s in (0.01, 0.1, 1.0) for _ in range(50)]
    print(f"J(pi*) = {best:.6f} = beta log Z = {beta * np.log(Z):.6f}; best of 150 perturbed policies {max(others):.6f}")
    check(abs(best - beta * np.log(Z)) < 1e-12 and max(others) < best,
          "pi* = pi_ref exp(r/beta) / Z attains beta log Z, and no perturbation of it does better")

    title("2. the implicit reward: beta log(pi*/pi_ref) is r up to a constant that cancels in comparisons")
    implicit = beta * np.log(pi_star / pi_ref)
    print("r                      ", np.round(r, 4))
    print("beta log(pi*/pi_ref)   ", np.round(implicit, 4), f"(shifted by -beta log Z = {-beta * np.log(Z):.4f})")
    diffs = implicit[:, None] - implicit[None, :]
    check(np.allclose(diffs, r[:, None] - r[None, :], atol=1e-12),
          "every difference of implicit rewards equals the true reward difference (Z cancels)")

    # Every ordered pair (i, j), i != j, labelled "i wins" with the Bradley-Terry probability p_ij.
    # The expected DPO loss of the pair is p_ij L(i beats j) + (1 - p_ij) L(j beats i): npgpt's
    # dpo_loss with label smoothing eps = 1 - p_ij (the chance the label says the opposite).
    I, J = np.array([(i, j) for i in range(K) for j in range(K) if i < j]).T
    p = 1 / (1 + np.exp(-(r[I] - r[J])))
    theta0 = np.log(pi_ref) + rng.normal(0, 0.3, K)                  # any policy will do for this check
    lp0 = np.log(softmax(theta0))
    ours = 0.0
    for i, j, pij in zip(I, J, p):
        w, l_ = (i, j) if pij >= 0.5 else (j, i)                      # the likelier winner as "chosen"
        ours += float(dpo_loss(Tensor(lp0[[w]]), Tensor(lp0[[l_]]), np.log(pi_ref[[w]]), np.log(pi_ref[[l_]]),
                               beta=beta, label_smoothing=1 - max(pij, 1 - pij)).data)
    composed = float(_expected_dpo(Tensor(lp0[I]), Tensor(lp0[J]), np.log(pi_ref[I]), np.log(pi_ref[J]), p, beta).data)
    print(f"expected DPO loss over Bradley-Terry labels, {len(I)} pairs: npgpt dpo_loss (eps = 1 - p) {ours:.6f}, "
          f"composed {composed:.6f}")
    check(abs(ours - composed) < 1e-10, "the expected DPO loss over noisy labels is conservative DPO with eps = 1 - p")

    theta = Tensor(np.log(pi_ref).copy(), requires_grad=True)        # start at the reference
    lr, steps = 2.0, 300 if args.fast else 2000
    for step in range(steps):
        logp = theta.log_softmax(axis=-1)                            # log pi(y), all K answers
        lw, ll = logp[I], logp[J]
        loss = _expected_dpo(lw, ll, np.log(pi_ref[I]), np.log(pi_ref[J]), p, beta)
        theta.grad = None
        loss.backward()
        theta.data -= lr * theta.grad
    pi_dpo = softmax(theta.data)
    kl = float(np.sum(pi_star * np.log(pi_star / pi_dpo)))
    print(f"after {steps} steps of DPO on every pair's expected loss: |KL(pi* || pi_dpo)| = {abs(kl):.1e}")
    print("pi*     ", np.round(pi_star, 4))
    print("pi_dpo  ", np.round(pi_dpo, 4))
    check(kl < (1e-3 if args.fast else 1e-6), "DPO's minimiser is the RLHF optimum pi*, with no reward model")

    title("3. the policy gradient, with and without a baseline")
    R = (rng.random(K) < 0.5).astype(float)                  # a checker: each answer is right or wrong
    th = rng.normal(0, 0.5, K)
    pi = softmax(th)
    exact = pi * (R - pi @ R)                                # d/dtheta_k sum_y pi_y R_y
    G, trials = 8, 4000 if args.fast else 40000
    ys = np.array([rng.choice(K, size=G, p=pi) for _ in range(trials)])        # (trials, G) sampled answers
    onehot = np.eye(K)[ys]                                   # (trials, G, K)
    glogp = onehot - pi                                      # grad_theta log pi(y) = onehot(y) - pi
    rew = R[ys]                                              # (trials, G)
    plain = (rew[..., None] * glogp).mean(axis=1)            # REINFORCE, b = 0
    loo = ((rew - (rew.sum(axis=1, keepdims=True) - rew) / (G - 1))[..., None] * glogp).mean(axis=1)
    group = ((rew - rew.mean(axis=1, keepdims=True))[..., None] * glogp).mean(axis=1)
    se = lambda est: est.std(axis=0).max() / np.sqrt(trials)            # noqa: E731
    for name, est, want in (("b = 0", plain, exact), ("leave-one-out mean", loo, exact),
                            ("group mean (GRPO)", group, exact * (G - 1) / G)):
        err = np.abs(est.mean(axis=0) - want).max()
        print(f"{name:20s} mean error {err:.4f} (5 standard errors: {5 * se(est):.4f}), "
              f"variance {est.var(axis=0).sum():.5f}")
        check(err < 5 * se(est), f"the estimator with {name} averages to " +
              ("(G-1)/G times " if "group" in name else "") + "the exact gradient")
    ratio = plain.var(axis=0).sum() / loo.var(axis=0).sum()
    check(ratio > 1.5, f"the baseline cuts the estimator's variance ({ratio:.1f}x less)")

    title("4. a bandit learns from sampled groups (npgpt's policy_gradient_loss)")
    theta = Tensor(th.copy(), requires_grad=True)
    start = float(softmax(theta.data) @ R)
    for step in range(60 if args.fast else 200):
        y = rng.choice(K, size=(4, G), p=softmax(theta.data)).reshape(-1)   # 4 prompts x G answers
        logp = theta.log_softmax(axis=-1)[y].reshape(-1, 1)                # (N, 1): one token per answer
        loss = policy_gradient_loss(logp, group_advantages(R[y], G), np.ones((len(y), 1), bool))
        theta.grad = None
        loss.backward()
        theta.data -= 0.5 * theta.grad
    end = float(softmax(theta.data) @ R)
    print(f"expected reward {start:.3f} -> {end:.3f} (the best answer scores {R.max():.0f})")
    check(end > max(start + 0.2, 0.9 * R.max()), "the policy gradient moves the policy onto the right answers")

    if args.out and have_matplotlib():
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        w = 0.27
        a1.bar(np.arange(K) - w, pi_ref, w, label="pi_ref (SFT)")
        a1.bar(np.arange(K), pi_star, w, label="pi* (RLHF optimum)")
        a1.bar(np.arange(K) + w, pi_dpo, w, label="pi after DPO")
        a1.set_xlabel("answer y")
        a1.set_title("DPO lands on the RLHF optimum")
        a1.legend(fontsize=8)
        names = ["b = 0", "leave-one-out", "group mean"]
        a2.bar(names, [e.var(axis=0).sum() for e in (plain, loo, group)])
        a2.set_title(f"policy-gradient variance, G = {G}")
        fig.tight_layout()
        path = Path(args.out) / "19_preferences.png"
        save_figure(plt, fig, path, dpi=90)      # atomic; a link or device: npgpt.fileio's rules
        print(f"picture: {path}")
    return {"kl_dpo": kl, "variance_ratio": float(ratio), "reward": (start, end)}


def _expected_dpo(lw, ll, rw, rl, p, beta):
    """sum over pairs of p L(w beats l) + (1 - p) L(l beats w), composed from primitives."""
    h = ((lw - Tensor(rw)) - (ll - Tensor(rl))) * beta
    return -(h.sigmoid().log() * Tensor(p) + (-h).sigmoid().log() * Tensor(1 - p)).sum()


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
