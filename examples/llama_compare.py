"""npgpt's Llama family against Hugging Face transformers: logits, loss, every parameter's gradient,
greedy decoding with the KV cache, and the export back to transformers.

    python examples/llama_compare.py           # the table in README's "Models" section
    python examples/llama_compare.py --json    # one JSON object per case

For each case a random model is built with transformers (float32, eager attention): weights drawn
N(0, 0.1) so the layers are far from linear, RMSNorm scales N(1, 0.2) and q/k/v biases N(0, 0.2) so a
missed scale or bias shows. It is saved with `save_pretrained` (safetensors) and loaded with
`npgpt.from_pretrained`; both then run the same batch (B 2, T 12): logits, the mean
cross-entropy of the next tokens, and loss.backward(). Errors are relative, max |npgpt - hf| / max |hf|,
over the logits, the loss, and per parameter gradient (the table shows the worst parameter).
"greedy" compares 16 tokens of KV-cached greedy decoding (transformers' generate against
npgpt.generate). "export" saves the npgpt model with npgpt's save_pretrained, loads that folder with
transformers' AutoModelForCausalLM and compares its logits with npgpt's. Last, transformers' own
sharded saves in bfloat16 and float16 (model.safetensors.index.json) load in npgpt.

PyTorch and transformers are not dependencies of npgpt: without them this script says so and
exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

try:
    import torch
    import transformers
except ImportError:
    torch = transformers = None

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

CASES = [
    ("llama, GQA 4/2, untied head", "llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    ("llama, MQA 4/1, tied, llama3 RoPE", "llama", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                                         rope_theta=500000.0, rope_scaling=LLAMA3)),
    ("llama, head_dim 12, linear RoPE x2", "llama", dict(num_key_value_heads=2, head_dim=12, tie_word_embeddings=False,
                                                         rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("qwen2, GQA 4/2, q/k/v biases", "qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    ("qwen2, MQA 4/1, tied, biases", "qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
]


def hf_model(kind, extra, seed):
    torch.manual_seed(seed)
    cls_cfg, cls = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if kind == "llama" else
                    (transformers.Qwen2Config, transformers.Qwen2ForCausalLM))
    cfg = cls_cfg(**SIZES, **extra, attn_implementation="eager")
    model = cls(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    return model


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def compare(name, kind, extra, seed=0, B=2, T=12, new_tokens=16):
    from npgpt.generate import generate
    from npgpt.loading import from_pretrained
    hf = hf_model(kind, extra, seed)
    idx = np.random.default_rng(seed).integers(0, SIZES["vocab_size"], size=(B, T + 1))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = from_pretrained(d)
    # ---- forward and backward on the same batch
    x, y = torch.tensor(idx[:, :-1]), torch.tensor(idx[:, 1:])
    hf.train()
    hf.zero_grad()
    logits_hf = hf(input_ids=x).logits
    loss_hf = torch.nn.functional.cross_entropy(logits_hf.reshape(-1, logits_hf.shape[-1]), y.reshape(-1))
    loss_hf.backward()
    ours.train()
    logits, loss = ours(idx[:, :-1], idx[:, 1:])
    loss.backward()
    hf_grads = {n: p.grad.detach().numpy() for n, p in hf.named_parameters() if p.grad is not None}
    grad_errs = {}
    for n, p in ours.named_parameters():
        g = hf_grads[n]
        grad_errs[n] = rel(p.grad, g.T if n.endswith("_proj.weight") else g)
    worst = max(grad_errs, key=grad_errs.get)
    # ---- greedy decoding with the KV cache
    hf.eval()
    ours.eval()
    prompt = idx[0, :5].tolist()
    with torch.no_grad():
        gen = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                          pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    greedy = generate(ours, prompt, new_tokens, temperature=0)
    # ---- the export back to transformers
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        back = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").float().eval()
        with torch.no_grad():
            back_logits = back(input_ids=x).logits.numpy()
        arch = back.config.architectures
    return {"case": name, "logits": rel(logits.data, logits_hf.detach().numpy()),
            "loss": rel(loss.data, loss_hf.item()), "grads": grad_errs[worst], "worst_grad": worst,
            "n_params": len(grad_errs), "greedy_equal": greedy == gen, "greedy_tokens": new_tokens,
            "export": rel(back_logits, ours(idx[:, :-1])[0].data), "export_arch": arch}


def sharded_half(kind="llama", seed=3, T=12):
    """transformers' own sharded save in bfloat16 and float16 (max_shard_size 40KB), loaded by npgpt:
    its logits against the same rounded weights run by transformers in float32."""
    from npgpt.loading import from_pretrained
    out = {}
    idx = np.random.default_rng(seed).integers(0, SIZES["vocab_size"], size=(1, T))
    for dtype in (torch.bfloat16, torch.float16):
        hf = hf_model(kind, dict(num_key_value_heads=2), seed).to(dtype)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d, max_shard_size="40KB")
            shards = len([f for f in os.listdir(d) if f.endswith(".safetensors")])
            ours = from_pretrained(d).eval()
        # a fresh float32 model holding the rounded weights (hf.float() would keep RoPE's inv_freq buffer
        # rounded to 16 bits too, which npgpt computes in float64)
        ref = hf_model(kind, dict(num_key_value_heads=2), seed).eval()
        ref.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
        with torch.no_grad():
            want = ref(input_ids=torch.tensor(idx)).logits.numpy()
        out[str(dtype).split(".")[-1]] = (shards, rel(ours(idx)[0].data, want))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="Print one JSON object per case.")
    args = ap.parse_args(argv)
    if torch is None:
        print("llama_compare: PyTorch and transformers are not installed; nothing to compare (pip install torch "
              "transformers)")
        return 0
    torch.set_num_threads(2)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows = [compare(*c) for c in CASES]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; float32, B 2, T 12; "
          f"errors are max |npgpt - hf| / max |hf|")
    print(f"{'case':<38} {'logits':>8} {'loss':>8} {'grads (worst of all)':>22} {'greedy':>8} {'export':>8}")
    for r in rows:
        print(f"{r['case']:<38} {r['logits']:8.1e} {r['loss']:8.1e} {r['grads']:9.1e} ({r['n_params']:2d} tensors) "
              f"{'same' if r['greedy_equal'] else 'DIFFER':>8} {r['export']:8.1e}")
    for dtype, (shards, err) in sharded_half().items():
        print(f"transformers' {dtype} save in {shards} shards, loaded by npgpt: logits {err:.1e} against the same "
              f"rounded weights in transformers (float32)")
        if err > 1e-5:
            rows.append({"case": f"sharded {dtype}", "logits": err, "loss": 0, "grads": 0, "export": 0,
                         "greedy_equal": True})
    bad = [r["case"] for r in rows if max(r["logits"], r["loss"], r["grads"], r["export"]) > 1e-5 or not r["greedy_equal"]]
    print("all within 1e-5, greedy tokens identical" if not bad else f"outside 1e-5 or greedy differs: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
