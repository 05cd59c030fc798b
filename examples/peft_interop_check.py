"""Check that npgpt's LoRA adapters and Hugging Face PEFT's agree, logits to logits, both ways.

Optional: needs torch, transformers and peft, which npgpt itself never uses. Run it in a separate
environment:  pip install torch transformers peft && pip install -e . && python examples/peft_interop_check.py

1. npgpt -> PEFT: an adapter trained-looking in npgpt (random B) and saved with save_adapter loads
   with PeftModel.from_pretrained onto the same GPT-2 base; the logits agree, and so do the
   merged weights (PEFT's merge_and_unload against npgpt's merge_lora).
2. PEFT -> npgpt: an adapter made by get_peft_model (random B) and saved by PEFT loads with
   npgpt's load_adapter; the logits agree.
3. The same both ways on a Llama (grouped-query attention, PEFT's target names q_proj, k_proj,
   v_proj, o_proj, gate_proj, up_proj, down_proj on torch Linear layers, fan_in_fan_out false).
"""

import argparse
import sys
import tempfile

import numpy as np

# --help prints this page; the check takes no options (it writes only to a temporary folder)
argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

try:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2LMHeadModel
except ImportError:
    print("skipped: this check needs torch, transformers and peft (pip install torch transformers peft)")
    sys.exit(0)

from npgpt import GPT, GPTConfig
from npgpt.lora import LoRAConfig, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter


def compare(a, b, what, tol=1e-5):
    err = float(np.abs(a - b).max() / np.abs(b).max())
    print(f"{what}: max relative difference {err:.2e} ({'ok' if err < tol else 'MISMATCH'})")
    return err < tol


ok = True
with tempfile.TemporaryDirectory() as d:
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)
    base = GPT(cfg, seed=0)
    r = np.random.default_rng(1)
    for _, p in base.named_parameters():
        p.data += r.normal(0, 0.05, p.shape).astype(np.float32)
    base.save_pretrained(d + "/base")
    x = r.integers(0, 50, (2, 16))

    # 1. npgpt -> PEFT
    ours = GPT.from_pretrained(d + "/base")
    apply_lora(ours, LoRAConfig(r=4, alpha=8, targets=("c_attn", "c_proj", "c_fc")))
    for _, lin in lora_layers(ours):
        lin.lora_B.data[...] = r.normal(0, 0.2, lin.lora_B.shape)
    save_adapter(ours, d + "/ours", base_model=d + "/base")
    theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(d + "/base"), d + "/ours").eval()
    with torch.no_grad():
        t_logits = theirs(torch.tensor(x)).logits.numpy()
    ok &= compare(ours(x)[0].data, t_logits, "npgpt adapter, run by PEFT vs npgpt")
    merged_t = theirs.merge_and_unload()
    merge_lora(ours)
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        ok &= compare(ours.state_dict()[name], merged_t.state_dict()[name].numpy(), f"merged {name}")

    # 2. PEFT -> npgpt
    hf = GPT2LMHeadModel.from_pretrained(d + "/base")
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn", "mlp.c_proj"],
                                               fan_in_fan_out=True, lora_dropout=0.0))
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, 0, 0.2)
    peft_model.eval()
    with torch.no_grad():
        t_logits = peft_model(torch.tensor(x)).logits.numpy()
    peft_model.save_pretrained(d + "/theirs")
    mine = GPT.from_pretrained(d + "/base")
    load_adapter(mine, d + "/theirs")
    print("PEFT adapter layers loaded by npgpt:", [n for n, _ in lora_layers(mine)])
    ok &= compare(mine(x)[0].data, t_logits, "PEFT adapter, run by npgpt vs PEFT")

# 3. a Llama, both ways
from transformers import LlamaForCausalLM  # noqa: E402

from npgpt.llama import Llama, LlamaConfig  # noqa: E402
from npgpt.loading import from_pretrained  # noqa: E402

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
with tempfile.TemporaryDirectory() as d:
    base = Llama(LlamaConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=48),
                 seed=0)
    r = np.random.default_rng(2)
    for _, p in base.named_parameters():
        p.data += r.normal(0, 0.05, p.shape).astype(np.float32)
    base.save_pretrained(d + "/base")
    x = r.integers(0, 50, (2, 16))
    ours = from_pretrained(d + "/base")
    apply_lora(ours, LoRAConfig(r=4, alpha=8, targets=LLAMA_TARGETS))
    for _, lin in lora_layers(ours):
        lin.lora_B.data[...] = r.normal(0, 0.2, lin.lora_B.shape)
    save_adapter(ours, d + "/ours", base_model=d + "/base")
    theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(d + "/base"), d + "/ours").eval()
    with torch.no_grad():
        t_logits = theirs(torch.tensor(x)).logits.numpy()
    ok &= compare(ours(x)[0].data, t_logits, "npgpt Llama adapter, run by PEFT vs npgpt")
    merged_t = theirs.merge_and_unload()
    merge_lora(ours)
    name = "model.layers.1.self_attn.k_proj.weight"                    # (in, out) here, (out, in) in torch
    ok &= compare(ours.state_dict()[name], merged_t.state_dict()[name].numpy().T, f"merged {name}")

    hf = LlamaForCausalLM.from_pretrained(d + "/base")
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                                               lora_dropout=0.0))
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, 0, 0.2)
    peft_model.eval()
    with torch.no_grad():
        t_logits = peft_model(torch.tensor(x)).logits.numpy()
    peft_model.save_pretrained(d + "/theirs")
    mine = from_pretrained(d + "/base")
    load_adapter(mine, d + "/theirs")
    print("PEFT Llama adapter layers loaded by npgpt:", len(lora_layers(mine)))
    ok &= compare(mine(x)[0].data, t_logits, "PEFT Llama adapter, run by npgpt vs PEFT")

print("PEFT interop: all agree" if ok else "PEFT interop: MISMATCH")
sys.exit(0 if ok else 1)
