"""Measure DPO and RL after SFT on the translation app (English number words -> Chinese numerals).

    python examples/preference_rl.py [--out DIR] [--sft-steps N] [--dpo-steps N] [--rl-steps N] [--fast]

1. SFT: the translation app's model and recipe (examples/apps: 2 layers, n_embd 64, character
   tokens), trained for fewer steps than the app's 400 so the held-out accuracy leaves room to
   improve; saved as a model folder.
2. DPO: preference pairs over the training numbers only: chosen = the true numeral, rejected =
   the SFT model's own answer (sampled at temperature 1) when it is wrong -- the mistakes this model
   actually makes. `npgpt.dpo.finetune_dpo` from the SFT folder.
3. RL: `npgpt.rl.finetune_rl` on the task `number-words` from the same SFT folder (the reward is
   exact match on sampled answers to training numbers).
4. The table: exact match of greedy answers on the 200 held-out numbers (never trained on by any
   stage), the held-out preference accuracy (DPO), steps and wall time of each stage.

Every figure is printed and written to DIR/results.json. The README's "Preference tuning and RL"
table comes from this script.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps"))
from app_kit import char_tokenizer, encode_pairs, model_for, train_rows  # noqa: E402

from npgpt.dpo import finetune_dpo  # noqa: E402
from npgpt.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from npgpt.generate import generate  # noqa: E402
from npgpt.loading import from_pretrained  # noqa: E402
from npgpt.rl import PromptSource, finetune_rl, greedy_reward  # noqa: E402
from npgpt.tokenizer import load as load_tokenizer  # noqa: E402
from npgpt.training.config import TrainConfig  # noqa: E402
from npgpt.verifiable import get_task, number_words  # noqa: E402


def held_out_accuracy(folder):
    """Exact match of greedy answers on the task's 200 held-out numbers."""
    model = from_pretrained(folder)
    tok = load_tokenizer(folder)
    src = PromptSource.build(tok, get_task("number-words"), 0, model.config.block_size)
    return greedy_reward(model, src, "val", range(len(src.prompts["val"])),
                         lambda p, got, want: float(got == want))


def main(argv=None):
    from npgpt.programs import existing_path, out_dir, positive_int   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", default="out-preference-rl", type=out_dir, help="folder for the models and results.json")
    ap.add_argument("--sft-steps", type=positive_int, default=150)
    ap.add_argument("--dpo-steps", type=positive_int, default=150)
    ap.add_argument("--rl-steps", type=positive_int, default=150)
    ap.add_argument("--dpo-lr", type=float, default=1e-3, help="DPO's peak learning rate (checked by TrainConfig)")
    ap.add_argument("--dpo-beta", type=float, default=0.1, help="DPO's beta")
    ap.add_argument("--rl-lr", type=float, default=1e-3, help="RL's peak learning rate")
    ap.add_argument("--skip-rl", action="store_true", help="measure SFT and DPO only")
    ap.add_argument("--skip-dpo", action="store_true", help="measure SFT and RL only")
    ap.add_argument("--sft-from", default=None, type=existing_path,
                    help="reuse the SFT model of an earlier run (its OUT/sft folder)")
    ap.add_argument("--fast", action="store_true", help="tiny steps, to see it run (also NPGPT_FAST=1)")
    args = ap.parse_args(argv)
    if args.fast or os.environ.get("NPGPT_FAST") == "1":
        args.sft_steps, args.dpo_steps, args.rl_steps = 20, 4, 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}

    # 1. SFT
    train, test = number_words(0)
    tok = char_tokenizer([p + a for p, a in train + test])
    block = max(len(p) + len(a) + 1 for p, a in train + test)
    sft = out / "sft"
    if args.sft_from:
        sft = Path(args.sft_from)
        model, tok = from_pretrained(sft), load_tokenizer(sft)
        results["sft"] = {"from": str(sft)}
    else:
        model = model_for(tok.vocab_size, block, fast=False, seed=0)
        t0 = time.perf_counter()
        train_rows(model, encode_pairs(tok, train), args.sft_steps, block, tok.eot_id, seed=0, log=False)
        results["sft"] = {"steps": args.sft_steps, "seconds": time.perf_counter() - t0}
        model.save_pretrained(sft)
        tok.save(sft)
    results["sft"]["held_out_exact"] = held_out_accuracy(sft)
    print("SFT:", results["sft"])

    common = dict(init_from=str(sft), seed=0, force=True, eval_iters=5, weight_decay=0.0, warmup_iters=5, quiet=True)
    if not args.skip_dpo:
        results["dpo"] = dpo_stage(args, model, tok, train, out, common)
        print("DPO:", results["dpo"])
    if not args.skip_rl:
        results["rl"] = rl_stage(args, out, common)
        print("RL:", results["rl"])
    results["load"] = os.getloadavg()
    atomic_write_json(out / "results.json", results)
    return results


def dpo_stage(args, model, tok, train, out, common):
    """Preference pairs from the SFT model's own mistakes on training numbers, then DPO."""
    prompts = [tok.encode_plain(p) for p, _ in train]
    rng = np.random.default_rng(0)
    seen, pairs = set(), []
    for k in range(4):                                          # a few samples per number
        got = generate(model, prompts, max_new_tokens=8, temperature=1.0, seed=int(rng.integers(1 << 30)),
                       eot_id=tok.eot_id)
        for (p, want), g in zip(train, got):
            text = tok.decode([t for t in g if t != tok.eot_id])
            if text != want and (p, text) not in seen:
                seen.add((p, text))
                pairs.append({"prompt": p, "chosen": want, "rejected": text})
    prefs = out / "prefs.jsonl"
    atomic_write_text(prefs, "\n".join(json.dumps(r, ensure_ascii=False) for r in pairs) + "\n")
    print(f"{len(pairs)} preference pairs (the SFT model's wrong samples on training numbers)")
    t0 = time.perf_counter()
    cfg = TrainConfig(dpo=str(prefs), out=str(out / "dpo"), max_iters=args.dpo_steps, eval_interval=args.dpo_steps,
                      batch_size=16, learning_rate=args.dpo_lr, min_lr=args.dpo_lr / 10, dpo_beta=args.dpo_beta,
                      **common).validate()
    res = finetune_dpo(cfg)
    return {"steps": args.dpo_steps, "lr": args.dpo_lr, "beta": args.dpo_beta, "seconds": time.perf_counter() - t0,
            "pairs": len(pairs),
            "held_out_logp_accuracy_before": res.history[0]["val_logp_accuracy"],
            "held_out_logp_accuracy_after": res.history[-1]["val_logp_accuracy"],
            "held_out_pref_accuracy_after": res.history[-1]["val_pref_accuracy"],
            "held_out_margin_after": res.history[-1]["val_reward_margin"],
            "held_out_exact": held_out_accuracy(out / "dpo" / "ckpt")}


def rl_stage(args, out, common):
    """RL on the number-words task (exact-match reward on sampled answers to training numbers)."""
    t0 = time.perf_counter()
    cfg = TrainConfig(rl="number-words", out=str(out / "rl"), max_iters=args.rl_steps, eval_interval=args.rl_steps,
                      batch_size=8, learning_rate=args.rl_lr, min_lr=args.rl_lr / 10, rl_group_size=8, rl_kl=0.04,
                      rl_eval_prompts=200, **{**common, "eval_iters": 2}).validate()
    res = finetune_rl(cfg)
    return {"steps": args.rl_steps, "lr": args.rl_lr, "seconds": time.perf_counter() - t0,
            "held_out_exact_before": res.history[0]["val_reward"], "held_out_exact": res.history[-1]["val_reward"],
            "sampled_reward_last": res.history[-1].get("sampled_reward")}


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
