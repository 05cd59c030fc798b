"""Small shared builders for the training / CLI tests: a generated corpus and tiny configs."""

import numpy as np

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jolly vexing zebras and bright nymphs waltz by").split()


def corpus(n_words=3000, seed=0):
    """Deterministic English-ish text (no dependency on ../shared)."""
    r = np.random.default_rng(seed)
    words = r.choice(WORDS, size=n_words)
    lines = [" ".join(words[i:i + 12]) for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


TINY = ["--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=16", "--block-size", "16",
        "--batch-size", "4", "--set", "eval_iters=2", "--set", "log_interval=2", "--set", "warmup_iters=2"]


def hf_chat_tokenizer(template, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
                      bos=None, text=None, vocab_size=300, pre_tokenizer="gpt2", normalizer=None, add_bos=False):
    """An HFTokenizer (as read from tokenizer.json) with a chat template: BPE trained on `text` by npgpt,
    the `specials` as added tokens after it; `add_bos`: a TemplateProcessing post-processor puts `bos`
    first, as Llama 3's tokenizer.json does."""
    from npgpt.tokenizer import BPETokenizer
    from npgpt.tokenizer.hf import AddedToken, HFTokenizer
    bpe = BPETokenizer.train(text or corpus(), vocab_size, special_tokens=())
    table = {i: t for i, t in bpe._ordinary_items()}
    n = len(table)
    vocab = {t: i for i, t in table.items()}
    merges = [(table[a], table[b]) for a, b in bpe.merges]
    added = [AddedToken(n + k, name) for k, name in enumerate(specials)]
    post = None
    if add_bos:
        bos_id = n + specials.index(bos)
        post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    return HFTokenizer(vocab, merges, added, pre_tokenizer=pre_tokenizer, eos_token=eos, bos_token=bos,
                       chat_template=template, normalizer=normalizer, post_processor=post)
