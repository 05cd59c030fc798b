"""A CPU speedrun: the baby GPT on tiny Shakespeare (characters) to val loss 1.88, with statistics.

    python examples/speedrun.py --text tinyshakespeare.txt                 # the whole seed matrix
    python examples/speedrun.py --text input.txt --variants baseline,full --seeds 5
    python examples/speedrun.py --report                                   # the table from what ran
    python examples/speedrun.py --fast                                     # seconds: CI's smoke run

The target is nanoGPT's published CPU figure for this size (4 layers, 4 heads, 128 wide, context 64,
batch 12): val loss 1.88 after 2,000 steps. Each run trains one variant with one seed until a quick
evaluation (a fixed set of validation batches, the same for every run) reads <= the target, then
measures a *confirmation* loss on other validation batches. The run records steps, tokens, CPU
seconds and wall seconds to the target (with the load average: the machine may be shared, so
steps and tokens are the robust figures) in a JSON Lines file, one line per run, so an
interrupted matrix resumes where it stopped and `--report` can rebuild the table at any time.

Statistics, the way the modded-nanogpt record rules ask for them:
  * the target was reached: a one-sided one-sample t-test that the mean confirmation loss over
    seeds is below the target (early stopping on the quick evaluation stops on lucky dips; the
    confirmation batches are independent of that choice, so a variant that only brushed the target
    fails this test);
  * a change helps: a one-sided Welch t-test that its steps to target are fewer than the baseline's,
    and exact one-sided rank tests (Mann-Whitney) on steps and on CPU seconds, into which a run
    that stopped before the target enters at its bound (the test stays valid: see rank_test_less).
Student's t distribution is computed here (regularised incomplete beta, a continued fraction): no SciPy.

Variants: `baseline` is today's GPT-2 recipe with AdamW (the defaults of `npgpt train`); `full` is
the modern recipe (the `modern-baby` preset: Muon, rotary positions, QK-norm, ReLU^2, zero-initialised
output projections, an untied head, logit soft-capping); the others add one change to the baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET = 1.88
BATCH, BLOCK = 12, 64

# variant -> TrainConfig overrides on top of the baseline (the defaults of `npgpt train --preset baby`)
BASELINE = dict(preset="baby", batch_size=BATCH, block_size=BLOCK, learning_rate=1e-3, min_lr=1e-4,
                warmup_iters=100, max_iters=2000, beta2=0.99, weight_decay=0.1, grad_clip=1.0)
VARIANTS = {
    "baseline": {},
    "muon": dict(optimizer="muon"),
    "rope": dict(pos="rope"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp_act="relu2"),
    "zero_init_proj": dict(zero_init_proj=True),
    "untie_head": dict(untie_head=True),
    "logit_softcap": dict(logit_softcap=15.0),
    "full": dict(preset="modern-baby"),
}


# ---- Student's t, written out -----------------------------------------------------------------------
def _betacf(a, b, x, iters=300, eps=1e-15):
    """The continued fraction of the regularised incomplete beta function (Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))            # even step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))    # odd step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a, b, x):
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):                         # the fraction converges fast on this side
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t, df):
    """P(T > t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))     # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def t_test_below(values, threshold):
    """One-sided one-sample t-test of H1: mean(values) < threshold. Returns (t, p); p is nan for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return float("nan"), float("nan")
    sd = x.std(ddof=1)
    if sd == 0:
        return (-math.inf, 0.0) if x.mean() < threshold else (math.inf, 1.0)
    t = (x.mean() - threshold) / (sd / math.sqrt(x.size))
    return float(t), t_sf(-t, x.size - 1)


def welch_less(a, b):
    """One-sided Welch t-test of H1: mean(a) < mean(b). Returns (t, df, p); nan when either n < 2."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or b.size < 2:
        return float("nan"), float("nan"), float("nan")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    if va + vb == 0:
        return (-math.inf, math.inf, 0.0) if a.mean() < b.mean() else (math.inf, math.inf, 1.0)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return float(t), float(df), t_sf(-t, df)


def rank_test_less(a, b):
    """Exact one-sided Mann-Whitney test of H1: values in `a` tend to be smaller than those in `b`.
    Returns (U, p): U counts the pairs a_i < b_j (ties 1/2); p is the share of the C(n+m, n) ways to
    split the pooled values whose U is at least as large (exact: fine for the dozen runs here).

    A run that did not reach the target enters at its bound (its steps or CPU seconds when it
    stopped; the truth is larger): raising a `b` value can only raise U, so for a censored `b`
    the p computed from the bounds is an upper bound on the true one (the test stays valid)."""
    from itertools import combinations
    a, b = [float(x) for x in a], [float(x) for x in b]
    if not a or not b:
        return float("nan"), float("nan")

    def u_of(xs, ys):
        return sum(1.0 if x < y else 0.5 if x == y else 0.0 for x in xs for y in ys)
    pooled, n = a + b, len(a)
    u = u_of(a, b)
    count = total = 0
    for idx in combinations(range(len(pooled)), n):
        chosen = set(idx)
        xs = [pooled[i] for i in idx]
        ys = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        total += 1
        count += u_of(xs, ys) >= u - 1e-9
    return u, count / total


# ---- one run ----------------------------------------------------------------------------------------
def fixed_batches(data, n, seed):
    """n validation batches drawn once from `seed`: every run and variant sees the same ones."""
    rng = np.random.default_rng(seed)
    return [data.get_batch("val", BATCH, BLOCK, rng) for _ in range(n)]


def mean_loss(model, batches):
    from npgpt.tensor import no_grad
    model.eval()
    with no_grad():
        total = sum(float(model(x, y)[1].data) for x, y in batches)
    model.train()
    return total / len(batches)


def run_one(data, variant, seed, target, quick, confirm, max_iters=None, log=print, progress=None):
    """Train `variant` with `seed` until the quick evaluation reads <= target; the run's record.
    progress: a file to which every quick evaluation appends a line (a run cut short still shows its curve)."""
    from npgpt.distributed.comm import SingleProcess
    from npgpt.fileio import open_log
    from npgpt.train import TrainConfig, build_model, build_optimizer, lr_at, step_rng, train_step
    from npgpt.training.config import preset_defaults
    # the baseline's settings, then what the variant's preset brings (modern-baby: Muon), then the variant's own
    over = {**BASELINE, **preset_defaults(VARIANTS[variant].get("preset")), **VARIANTS[variant]}
    if max_iters:
        over["max_iters"] = max_iters
    cfg = TrainConfig(data=str(data.path), out=tempfile.gettempdir(), seed=seed, quiet=True, **over).validate()
    model, _ = build_model(cfg, data, lambda msg: None)
    model.train()
    optimizer = build_optimizer(model.named_parameters(), SingleProcess(), cfg)
    load0, cpu0, wall0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    train_cpu = train_wall = 0.0
    curve, reached, it = [], None, 0
    next_eval = 0
    while True:
        if it == next_eval or it == cfg.max_iters:
            val = mean_loss(model, quick)
            curve.append((it, round(val, 5)))
            if progress is not None:
                with open_log(progress) as f:
                    f.write(json.dumps({"variant": variant, "seed": seed, "step": it, "val": round(val, 5),
                                        "train_cpu_s": round(train_cpu, 2), "train_wall_s": round(train_wall, 2),
                                        "load": round(os.getloadavg()[0], 2)}) + "\n")
            if val <= target:
                reached = it
                break
            if it == cfg.max_iters or not math.isfinite(val):
                break
            # coarse far from the target, fine near it: evaluation costs forward passes
            next_eval = it + (100 if val > target + 0.25 else 50 if val > target + 0.08 else 25)
            next_eval = min(next_eval, cfg.max_iters)
        c, w = time.process_time(), time.perf_counter()
        batch = [data.get_batch("train", BATCH, BLOCK, step_rng(seed, it))]
        train_step(model, optimizer, batch, 1, cfg.grad_clip, lr_at(it, cfg))
        train_cpu += time.process_time() - c
        train_wall += time.perf_counter() - w
        it += 1
    confirm_loss = mean_loss(model, confirm)
    rec = {"variant": variant, "seed": seed, "target": target, "reached": reached is not None,
           "steps": reached, "tokens": None if reached is None else reached * BATCH * BLOCK,
           "train_cpu_s": round(train_cpu, 2), "train_wall_s": round(train_wall, 2),
           "total_cpu_s": round(time.process_time() - cpu0, 2), "total_wall_s": round(time.perf_counter() - wall0, 2),
           "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2), "last_step": it,
           "confirm_loss": round(confirm_loss, 5), "curve": curve, "config": VARIANTS[variant]}
    log(f"{variant} seed {seed}: " + (f"target {target} at step {reached} ({rec['tokens']:,} tokens)"
                                      if reached is not None else f"target not reached in {it} steps")
        + f", confirmation loss {confirm_loss:.4f}, {train_cpu:.0f} CPU-s / {train_wall:.0f} s training "
        f"(load {load0:.1f} -> {rec['load_end']:.1f})")
    return rec


# ---- the table --------------------------------------------------------------------------------------
def _ms(values, fmt="{:.0f}"):
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return "–"
    if v.size == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def _cost(rs, key):
    """A run's cost to the target: `key` (steps, tokens, train_cpu_s, train_wall_s) when it reached the
    target, else its value when it stopped (a lower bound on the truth); and whether any was censored."""
    out = []
    for r in rs:
        if key == "steps":
            out.append(r["steps"] if r["reached"] else r["last_step"])
        elif key == "tokens":
            out.append(r["tokens"] if r["reached"] else r["last_step"] * BATCH * BLOCK)
        else:
            out.append(r[key])
    return out, any(not r["reached"] for r in rs)


def summarise(records, target):
    """{variant: statistics} over the runs in `records` (the last record per (variant, seed) counts).

    Runs that stopped before the target (censored) enter the comparisons at their bound: a
    variant's ratio to a baseline with censored runs is an upper bound ("≤"), and the rank tests
    (`rank_test_less`) stay valid; Welch's test of steps uses the runs that reached the target."""
    runs = {}
    for r in records:
        if r["target"] == target:
            runs[(r["variant"], r["seed"])] = r
    by_variant = {}
    for (v, _), r in sorted(runs.items()):
        by_variant.setdefault(v, []).append(r)
    base_rs = by_variant.get("baseline", [])
    base = [r["steps"] for r in base_rs if r["reached"]]
    out = {}
    for v in [k for k in VARIANTS if k in by_variant]:
        rs = by_variant[v]
        ok = [r for r in rs if r["reached"]]
        steps = [r["steps"] for r in ok]
        t, p_reached = t_test_below([r["confirm_loss"] for r in rs], target)
        _, _, p_fewer = welch_less(steps, base) if v != "baseline" else (None, None, float("nan"))
        s = {"n": len(rs), "reached": len(ok), "steps": steps, "tokens": [r["tokens"] for r in ok],
             "train_wall_s": [r["train_wall_s"] for r in ok], "train_cpu_s": [r["train_cpu_s"] for r in ok],
             "load": [0.5 * (r["load_start"] + r["load_end"]) for r in rs],
             "stopped": [(r["last_step"], r["train_cpu_s"]) for r in rs if not r["reached"]],
             "confirm": [r["confirm_loss"] for r in rs], "p_reached": p_reached, "p_fewer_steps": p_fewer}
        for key, name in (("steps", "steps"), ("train_cpu_s", "cpu"), ("train_wall_s", "wall")):
            mine, mine_cens = _cost(rs, key)
            theirs, base_cens = _cost(base_rs, key)
            s[f"{name}_ratio"] = float(np.mean(mine) / np.mean(theirs)) if mine and theirs else float("nan")
            # "≤": the baseline's true cost is larger; "≥": this variant's is; both: no bound
            s[f"{name}_bound"] = "" if not (mine_cens or base_cens) or v == "baseline" else \
                "≤" if base_cens and not mine_cens else "≥" if mine_cens and not base_cens else "?"
            if key != "train_wall_s":      # a censored run of this variant would make p too small: none then
                valid = v != "baseline" and not mine_cens
                s[f"p_rank_{name}"] = rank_test_less(mine, theirs)[1] if valid else float("nan")
        out[v] = s
    return out


def table(stats, target):
    """A Markdown table of `summarise`'s statistics."""
    def p(x):
        return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"

    def ratio(s, name):
        x, bound = s[f"{name}_ratio"], s[f"{name}_bound"]
        return "–" if not math.isfinite(x) or bound == "?" else f"{bound}{x:.2f}×"

    def with_stopped(s, values, i, fmt="{:.0f}"):
        text = _ms(values, fmt)
        if s["stopped"]:
            low = min(st[i] for st in s["stopped"])
            miss = f"{len(s['stopped'])} not by > {fmt.format(low)}"
            text = miss if not values else f"{text}; {miss}"
        return text
    lines = [f"| variant | seeds (reached) | steps to {target} | tokens (k) | CPU-s to target | wall s (load) | "
             f"confirm loss | p(reached) | p(fewer steps): Welch / rank | p(less CPU): rank | "
             f"steps / CPU / wall vs baseline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, s in stats.items():
        load = f" ({np.mean(s['load']):.0f})" if s["load"] else ""
        lines.append(f"| {v} | {s['n']} ({s['reached']}) | {with_stopped(s, s['steps'], 0)} | "
                     f"{_ms([t / 1000 for t in s['tokens']])} | {with_stopped(s, s['train_cpu_s'], 1)} | "
                     f"{_ms(s['train_wall_s'])}{load} | {_ms(s['confirm'], '{:.4f}')} | {p(s['p_reached'])} | "
                     f"{p(s['p_fewer_steps'])} / {p(s['p_rank_steps'])} | {p(s['p_rank_cpu'])} | "
                     f"{ratio(s, 'steps')} / {ratio(s, 'cpu')} / {ratio(s, 'wall')} |")
    return "\n".join(lines)


def cut_short(progress_records, records):
    """Markdown lines for runs that progress.jsonl shows but results.jsonl does not hold (cut short by
    a deadline): the last quick evaluation each reached, with its step and CPU seconds."""
    finished = {(r["variant"], r["seed"]) for r in records}
    last = {}
    for p in progress_records:
        key = (p["variant"], p["seed"])
        if key not in finished:
            last[key] = p
    if not last:
        return ""
    lines = ["| variant | seed | last quick eval at step | val loss there | CPU-s | wall s (load) |", "|---|---|---|---|---|---|"]
    for (v, seed), p in sorted(last.items()):
        lines.append(f"| {v} | {seed} | {p['step']} | {p['val']:.4f} | {p['train_cpu_s']:.0f} | "
                     f"{p['train_wall_s']:.0f} ({p['load']:.0f}) |")
    return "\n".join(lines)


def read_records(path):
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- main -------------------------------------------------------------------------------------------
def prepared(text, folder):
    """The character-level data of `text` in `folder` (prepared once)."""
    from npgpt.data import TokenData, prepare
    folder = Path(folder)
    if not (folder / "meta.json").exists():
        prepare([str(text)], str(folder), tokenizer="char", force=True)
    return TokenData(folder)


def main(argv=None):
    from npgpt.programs import non_negative_int, out_dir, positive_int, text_file   # the CLI's checks and one-line errors
    from npgpt.fileio import atomic_write_text, open_log     # links and devices in --out: npgpt.fileio's rules
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=text_file, help="the training text (tiny Shakespeare's input.txt); never copied elsewhere")
    ap.add_argument("--out", default="speedrun-out", type=out_dir, help="folder for the prepared data and results.jsonl")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--seeds", type=positive_int, default=5, help="seeds for baseline and full (default 5)")
    ap.add_argument("--single-seeds", type=positive_int, default=3, help="seeds for each single change (default 3)")
    ap.add_argument("--seed-offset", type=non_negative_int, default=0,
                    help="run seeds K, K+1, ... (several processes can share one results.jsonl)")
    ap.add_argument("--target", type=float, default=TARGET)
    ap.add_argument("--max-iters", type=positive_int, default=None, help="cap on steps per run (default: the variant's)")
    ap.add_argument("--quick-batches", type=int, default=16, help="validation batches of the stopping check")
    ap.add_argument("--confirm-batches", type=positive_int, default=64, help="validation batches of the confirmation")
    ap.add_argument("--report", action="store_true", help="only print the table of what results.jsonl holds")
    ap.add_argument("--fast", action="store_true", help="seconds: the Python docs, a loose target, 2 seeds (CI)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if args.fast:
        args.target, args.seeds, args.single_seeds = 3.6, 2, 2
        args.max_iters, args.quick_batches, args.confirm_batches = args.max_iters or 15, 2, 4
        if args.variants == ap.get_default("variants"):
            args.variants = "baseline,full"
    if not args.report:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
        if args.text:
            data = prepared(args.text, out / "data")
        else:
            if not args.fast:
                raise SystemExit("--text FILE is required (tiny Shakespeare's input.txt); --fast uses the Python docs")
            from npgpt.data import pydoc_text
            atomic_write_text(out / "pydoc.txt", pydoc_text()[:300_000])
            data = prepared(out / "pydoc.txt", out / "data")
        quick = fixed_batches(data, args.quick_batches, seed=1_000_001)
        confirm = fixed_batches(data, args.confirm_batches, seed=2_000_002)
        done = {(r["variant"], r["seed"]) for r in read_records(results) if r["target"] == args.target}
        for v in variants:
            n = args.seeds if v in ("baseline", "full") else args.single_seeds
            for seed in range(args.seed_offset, args.seed_offset + n):
                if (v, seed) in done:
                    continue
                rec = run_one(data, v, seed, args.target, quick, confirm, args.max_iters, progress=out / "progress.jsonl")
                with open_log(results) as f:
                    f.write(json.dumps(rec) + "\n")
    stats = summarise(read_records(results), args.target)
    print(table(stats, args.target))
    partial = cut_short(read_records(out / "progress.jsonl"), read_records(results))
    if partial:
        print("\nruns cut short (not in the statistics):\n" + partial)
    return stats


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
