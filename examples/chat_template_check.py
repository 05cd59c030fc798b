"""Check npgpt's chat templates and tokenizer.json reading against Hugging Face transformers.

Optional: needs transformers (and tokenizers), which npgpt itself never uses. Run it in a separate
environment:  pip install transformers && pip install -e '.[test]' && python examples/chat_template_check.py

1. Each case of tests/chat_templates.py (ChatML, Llama 3, Qwen2-style with tools) is rendered by
   transformers' apply_chat_template and by npgpt's; both must equal the hand-written text.
2. A tokenizer saved by npgpt (tokenizer.json + tokenizer_config.json) loads in transformers as
   PreTrainedTokenizerFast, and both tokenize every rendered conversation to the same ids.
3. With a template that marks the assistant's text with {% generation %}, both give the same
   assistant token mask (return_assistant_tokens_mask).
"""

import argparse
import sys
import tempfile
from pathlib import Path

# --help prints this page; the check takes no options (it writes only to a temporary folder)
argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

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
    tracked = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
               "{{ m.content }}<|im_end|>{% endgeneration %}\n{% else %}{{ m.content }}<|im_end|>\n{% endif %}"
               "{% endfor %}")
    talk = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "a lazy dog"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "seven wizards"}]
    tok = hf_chat_tokenizer(tracked, specials=SPECIALS, eos="<|im_end|>")
    tok.save(d)
    theirs = PreTrainedTokenizerFast.from_pretrained(d)
    hf = theirs.apply_chat_template(talk, return_dict=True, return_assistant_tokens_mask=True)
    np_ = tok.apply_chat_template(talk, return_assistant_tokens_mask=True)
    same = list(hf["input_ids"]) == np_["input_ids"] and list(hf["assistant_masks"]) == np_["assistant_masks"]
    ok &= same
    print(f"{'generation':15s} assistant masks {'equal' if same else 'DIFFER'} ({sum(np_['assistant_masks'])} tokens)")
print("all agree" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
