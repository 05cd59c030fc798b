"""Check that npgpt's GPT-2 folders and Hugging Face transformers' agree, logits to logits.

Optional: needs torch and transformers, which npgpt itself never uses. Run it in a separate
environment:  pip install torch transformers && pip install -e . && python examples/hf_interop_check.py

1. npgpt -> transformers: a random npgpt model saved with save_pretrained loads as GPT2LMHeadModel.
2. transformers -> npgpt: a random GPT2LMHeadModel saved by transformers loads with GPT.from_pretrained.
"""

import argparse
import sys
import tempfile

import numpy as np

# --help prints this page; the check takes no options (it writes only to a temporary folder)
argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

try:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
except ImportError:
    print("skipped: this check needs torch and transformers (pip install torch transformers)")
    sys.exit(0)

from npgpt import GPT, GPTConfig, no_grad


def compare(a, b, what):
    err = np.abs(a - b).max() / np.abs(b).max()
    print(f"{what}: max relative difference {err:.2e}")
    return err < 1e-5


with tempfile.TemporaryDirectory() as d:
    ours = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32), seed=0)
    r = np.random.default_rng(1)
    for _, p in ours.named_parameters():            # non-trivial biases and LayerNorm parameters
        p.data += r.normal(0, 0.05, p.shape).astype(np.float32)
    ours.save_pretrained(d + "/npgpt")
    theirs = GPT2LMHeadModel.from_pretrained(d + "/npgpt").eval()
    x = r.integers(0, 50, (2, 16))
    with torch.no_grad():
        ht = theirs(torch.tensor(x)).logits.numpy()
    with no_grad():
        ok1 = compare(ours.eval()(x)[0].data, ht, "npgpt -> transformers")

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=12, n_embd=24, n_layer=3, n_head=3)).eval()
    hf.save_pretrained(d + "/hf")
    loaded = GPT.from_pretrained(d + "/hf")
    x = r.integers(0, 60, (2, 12))
    with torch.no_grad():
        ht = hf(torch.tensor(x)).logits.numpy()
    with no_grad():
        ok2 = compare(loaded(x)[0].data, ht, "transformers -> npgpt")

sys.exit(0 if ok1 and ok2 else 1)
