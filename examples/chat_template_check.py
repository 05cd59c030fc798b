"""Check npgpt's chat templates and tokenizer.json reading against Hugging Face transformers.

Optional: needs transformers (and tokenizers), which npgpt itself never uses. Run it in a separate
environment:  pip install transformers && pip install -e '.[test]' && python examples/chat_template_check.py

1. Each case of tests/chat_templates.py (ChatML, Llama 3, Qwen2-style with tools) is rendered by
   transformers' apply_chat_template and by npgpt's; both must equal the hand-written text.
2. A tokenizer saved by npgpt (tokenizer.json + tokenizer_config.json) loads in transformers as
   PreTrainedTokenizerFast, and both tokenize every rendered conversation to the same ids.
"""

import sys
import tempfile
from pathlib import Path

try:
    from transformers import PreTrainedTokenizerFast
except ImportError:
    print("skipped: this check needs transformers (pip install transformers)")
    sys.exit(0)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from chat_templates import CASES, SPECIAL_NAMES  # noqa: E402
from helpers import hf_chat_tokenizer  # noqa: E402

from npgpt.tokenizer.chat_template import ChatTemplate  # noqa: E402

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>")

ok = True
with tempfile.TemporaryDirectory() as d:
    for name, template, messages, kwargs, expected in CASES:
        tok = hf_chat_tokenizer(template, specials=SPECIALS, eos="<|eot_id|>", bos="<|begin_of_text|>")
        tok.save(d)
        theirs = PreTrainedTokenizerFast.from_pretrained(d)
        text_hf = theirs.apply_chat_template(messages, tokenize=False, **kwargs)
        text_np = ChatTemplate(template).render(messages, **kwargs, **SPECIAL_NAMES)
        ids_hf = theirs.apply_chat_template(messages, tokenize=True, **kwargs)
        if not isinstance(ids_hf, list):          # transformers 5 returns {"input_ids": ..., ...} by default
            ids_hf = ids_hf["input_ids"]
        ids_np = tok.apply_chat_template(messages, **kwargs)
        good = text_hf == expected and text_np == expected and list(ids_hf) == ids_np
        ok &= good
        print(f"{name:15s} transformers text {'==' if text_hf == expected else '!='} expected, npgpt text "
              f"{'==' if text_np == expected else '!='} expected, ids {'equal' if list(ids_hf) == ids_np else 'DIFFER'}")
print("all agree" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
