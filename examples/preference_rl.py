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
    from npgpt.programs import out_dir, positive_int   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", default="out-preference-rl", type=out_dir, help="folder for the models and results.json")
    ap.add_argument("--sft-steps", type=positive_int, default=150)
    ap.add_argument("--dpo-steps", type=positive_int, default=150)
    ap.add_argument("--rl-steps", type=positive_int, default=150)
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
    model = model_for(tok.vocab_size, block, fast=False, seed=0)
    t0 = time.perf_counter()
    train_rows(model, encode_pairs(tok, train), args.sft_steps, block, tok.eot_id, seed=0, log=False)
    results["sft"] = {"steps": args.sft_steps, "seconds": time.perf_counter() - t0}
    sft = out / "sft"
    model.save_pretrained(sft)
    tok.save(sft)
    results["sft"]["held_out_exact"] = held_out_accuracy(sft)
    print("SFT:", results["sft"])

    # 2. preference pairs from the SFT model's own mistakes on training numbers
    prompts = [tok.encode_plain(p) for p, _ in train]
    rng = np.random.default_rng(0)
    pairs = []
    for k in range(4):                                          # a few samples per number
        got = generate(model, prompts, max_new_tokens=8, temperature=1.0, seed=int(rng.integers(1 << 30)),
                       eot_id=tok.eot_id)
        for (p, want), g in zip(train, got):
            text = tok.decode([t for t in g if t != tok.eot_id])
            if text != want:
                pairs.append({"prompt": p, "chosen": want, "rejected": text})
    seen, unique = set(), []
    for r in pairs:
        key = (r["prompt"], r["rejected"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    prefs = out / "prefs.jsonl"
    atomic_write_text(prefs, "\n".join(json.dumps(r, ensure_ascii=False) for r in unique) + "\n")
    print(f"{len(unique)} preference pairs (the SFT model's wrong samples on training numbers)")

    common = dict(init_from=str(sft), seed=0, force=True, eval_iters=5, weight_decay=0.0, warmup_iters=5, quiet=True)
    # 3. DPO
    t0 = time.perf_counter()
    cfg = TrainConfig(dpo=str(prefs), out=str(out / "dpo"), max_iters=args.dpo_steps, eval_interval=args.dpo_steps,
                      batch_size=16, learning_rate=1e-3, min_lr=1e-4, dpo_beta=0.1, **common).validate()
    res = finetune_dpo(cfg)
    results["dpo"] = {"steps": args.dpo_steps, "seconds": time.perf_counter() - t0, "pairs": len(unique),
                      "held_out_logp_accuracy_before": res.history[0]["val_logp_accuracy"],
                      "held_out_logp_accuracy_after": res.history[-1]["val_logp_accuracy"],
                      "held_out_pref_accuracy_after": res.history[-1]["val_pref_accuracy"],
                      "held_out_margin_after": res.history[-1]["val_reward_margin"],
                      "held_out_exact": held_out_accuracy(out / "dpo" / "ckpt")}
    print("DPO:", results["dpo"])

    # 4. RL
    t0 = time.perf_counter()
    cfg = TrainConfig(rl="number-words", out=str(out / "rl"), max_iters=args.rl_steps, eval_interval=args.rl_steps,
                      batch_size=8, learning_rate=1e-3, min_lr=1e-4, rl_group_size=8, rl_kl=0.04,
                      rl_eval_prompts=200, **{**common, "eval_iters": 2}).validate()
    res = finetune_rl(cfg)
    results["rl"] = {"steps": args.rl_steps, "seconds": time.perf_counter() - t0,
                     "held_out_exact_before": res.history[0]["val_reward"],
                     "held_out_exact": res.history[-1]["val_reward"],
                     "sampled_reward_last": res.history[-1].get("sampled_reward")}
    print("RL:", results["rl"])
    results["load"] = os.getloadavg()
    atomic_write_json(out / "results.json", results)
    return results


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
