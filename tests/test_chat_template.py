"""The model's own chat template: rendering against hand-written strings, the transformers-like
environment, budgets against hostile templates, assistant masks, stop tokens, SFT and `npgpt chat`."""

import json
import time

import pytest
from click.testing import CliRunner

from npgpt.cli.main import cli
from npgpt.errors import NpgptError
from npgpt.sft import SFTData, is_chat_model, render_chat
from npgpt.tokenizer import load
from npgpt.tokenizer.chat_template import ChatTemplate

from chat_templates import CASES, CHATML, LLAMA3, QWEN2, SPECIAL_NAMES, TALK, TOOL_TALK, TOOLS
from helpers import hf_chat_tokenizer

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@pytest.mark.parametrize("name,template,messages,kwargs,expected", CASES, ids=[c[0] for c in CASES])
def test_renders_as_written_by_hand(name, template, messages, kwargs, expected):
    assert ChatTemplate(template).render(messages, **kwargs, **SPECIAL_NAMES) == expected


def test_environment_is_transformers_one():
    render = lambda src, **kw: ChatTemplate(src).render([], **kw)  # noqa: E731
    # trim_blocks + lstrip_blocks: a block tag's own line leaves no whitespace behind
    assert render("  {% if true %}\nA\n  {% endif %}\nB") == "A\nB"
    assert render("{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}"
                  "{% endif %}{{ i }}{% endfor %}") == "02"                       # loop controls
    assert render("{{ {'a': '<b>', 'é': 1}|tojson }}") == '{"a": "<b>", "é": 1}'   # no HTML escaping
    assert render("{{ [1]|tojson(indent=2) }}") == "[\n  1\n]"
    assert render("{{ strftime_now('%Y') }}") == time.strftime("%Y")
    with pytest.raises(NpgptError, match="refused the conversation: roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(NpgptError, match="sandbox forbids"):
        render("{{ messages.append(1) }}")                                      # immutable sandbox
    for broken in ("{% for %}", "{% break %}", "{% continue %}", "{{ " * 3000):   # fuzzing found the 2nd
        with pytest.raises(NpgptError, match="not valid Jinja"):
            ChatTemplate(broken)
    assert render("{{ bos_token }}|{{ tools is none }}", bos_token="<s>") == "<s>|True"


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set r = range(100000)|list %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "{{ 'x' * 10**9 }}", "{{ [0] * 10**9 }}", "{{ 10**100000 }}", "{{ 'x'|center(10**9) }}", "{{ 'x'.ljust(10**9) }}",
    "{{ '%0999999999d' % 1 }}", "{{ '{:>999999999}'.format(1) }}", "{{ ('ab' * 100000)|replace('', 'xyz' * 100) }}",
    "{{ range(100000)|join('y' * 1000) }}", "{{ (range(99999)|map('string'))|join('y' * 1000) }}",
    "{{ lipsum(10**6) }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% for i in range(3000) %}{{ 'x' * 3000 }}{% endfor %}",
])
def test_hostile_templates_stop_within_budget(source):
    t0 = time.monotonic()
    with pytest.raises(NpgptError, match="chat template (was stopped|recursed)"):
        ChatTemplate(source, max_chars=1 << 22, max_seconds=0.5).render([])
    assert time.monotonic() - t0 < 5


@pytest.fixture(scope="module")
def chatml_tok():
    return hf_chat_tokenizer(CHATML)


@pytest.fixture(scope="module")
def llama_tok():
    return hf_chat_tokenizer(LLAMA3, specials=LLAMA3_SPECIALS, eos="<|end_of_text|>", bos="<|begin_of_text|>")


def test_apply_chat_template_defaults(llama_tok):
    tok = llama_tok
    text = tok.apply_chat_template(TALK[:1], add_generation_prompt=True, tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template(TALK[:1], add_generation_prompt=True)        # tokenize=True by default
    assert ids == tok.encode(text, allowed_special="all") and ids[0] == tok.special_tokens["<|begin_of_text|>"]
    cont = tok.apply_chat_template(TALK[:2], continue_final_message=True, tokenize=False)
    assert cont.endswith("<|end_header_id|>\n\nHello!")
    # the end-of-turn token first, then every token the template writes between turns, then EOS
    assert tok.chat_stop_ids() == [tok.special_tokens[n] for n in ("<|eot_id|>", "<|start_header_id|>",
                                                                   "<|end_header_id|>", "<|end_of_text|>")]


@pytest.mark.parametrize("which", ["chatml", "llama3"])
def test_assistant_mask_by_prefixes(chatml_tok, llama_tok, which):
    tok = chatml_tok if which == "chatml" else llama_tok
    end = "<|im_end|>\n" if which == "chatml" else "<|eot_id|>"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the fox"},
                {"role": "assistant", "content": "a lazy dog"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "seven wizards"}]
    out = tok.apply_chat_template(messages, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids == tok.apply_chat_template(messages)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "a lazy dog" + end + "seven wizards" + end
    # the same conversation in SFT rows: targets are exactly the assistant tokens
    data = SFTData.build(tok, [{"messages": messages}], block_size=len(ids) - 1, val_fraction=0)
    x, y = data.rows["train"]
    assert tok.decode([t for t in y[0] if t >= 0]) == learned
    assert list(x[0]) == ids[:-1]


def test_generation_blocks_give_the_spans(chatml_tok):
    tracked = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
               "{{ m.content }}<|im_end|>{% endgeneration %}\n{% else %}{{ m.content }}<|im_end|>\n{% endif %}"
               "{% endfor %}")
    t = ChatTemplate(tracked)
    assert t.has_generation_blocks and not ChatTemplate(CHATML).has_generation_blocks
    text, spans = t.render_with_spans(TALK[:2])
    assert [text[a:b] for a, b in spans] == ["Hello!<|im_end|>"]
    out = chatml_tok.apply_chat_template(TALK[:2], return_assistant_tokens_mask=True, chat_template=tracked)
    assert chatml_tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]) == "Hello!<|im_end|>"


def test_template_that_rewrites_history_needs_generation_blocks(chatml_tok):
    # shows only the last assistant message in full: the prefixes do not line up
    src = ("{% for m in messages %}{{ m.role }}:{% if m.role == 'assistant' and not loop.last %}..."
           "{% else %}{{ m.content }}{% endif %}\n{% endfor %}")
    with pytest.raises(NpgptError, match="generation %} blocks"):
        chatml_tok.apply_chat_template(TALK + [{"role": "assistant", "content": "x"}],
                                       return_assistant_tokens_mask=True, chat_template=src)


def test_qwen_tools_through_the_tokenizer(chatml_tok):
    ids = chatml_tok.apply_chat_template(TOOL_TALK, tools=TOOLS, chat_template=QWEN2)
    assert chatml_tok.decode(ids) == dict((c[0], c[4]) for c in CASES)["qwen2-tools"]


def test_npgpt_models_keep_their_own_template():
    from npgpt.tokenizer import CharTokenizer
    tok = CharTokenizer.train("abc hi yo")
    assert tok.chat_template is None and not is_chat_model(tok)
    with pytest.raises(NpgptError, match="no chat template"):
        tok.apply_chat_template(TALK)
    ids, _ = render_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert ids[-1] == tok.special_tokens["<|assistant|>"] and is_chat_model(tok)
    assert tok.chat_stop_ids() == [tok.special_tokens[t] for t in ("<|system|>", "<|user|>", "<|assistant|>",
                                                                  "<|end|>")] + [tok.eot_id]


# ------------------------------------------------------------------ where a chat reply stops
GEMMA_LIKE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
              "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PLAIN_TEXT = ("{% for m in messages %}{{ m['role']|capitalize }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}Assistant:{% endif %}")
TURNS = {   # template, added tokens, EOS -> the stop tokens (end-of-turn first, EOS last), the stop strings
    "chatml": (CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_end|>",
               ["<|im_end|>", "<|im_start|>"], []),
    "llama3": (LLAMA3, LLAMA3_SPECIALS, "<|end_of_text|>",
               ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"], []),
    "qwen2": (QWEN2, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|endoftext|>",
              ["<|im_end|>", "<|im_start|>", "<|endoftext|>"], []),
    "gemma-no-system": (GEMMA_LIKE, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<eos>",
                        ["<end_of_turn>", "<start_of_turn>", "<eos>"], []),
    "plain-text": (PLAIN_TEXT, ("<|endoftext|>",), "<|endoftext|>", ["<|endoftext|>"], ["User:", "Assistant:"]),
}


@pytest.mark.parametrize("name", sorted(TURNS))
def test_a_reply_stops_on_every_turn_token_of_the_template(name):
    """The stops come from the template itself: every special token it writes between turns (the role
    starts too, not only the end-of-turn token), or its plain-text role markers when it writes none;
    SamplingParams.for_chat adds them to the caller's own stops, and the detokenizer cuts there."""
    from npgpt.sampling import Detokenizer, SamplingParams
    template, specials, eos, stop_names, stop_strings = TURNS[name]
    tok = hf_chat_tokenizer(template, specials=specials, eos=eos, bos=specials[0])
    assert tok.chat_stop_ids() == [tok.special_tokens[n] for n in stop_names]
    assert tok.chat_stop_strings() == stop_strings
    params = SamplingParams(stop=["zebra"], stop_token_ids=[3]).for_chat(tok)
    assert params.stop_token_ids == (3, *tok.chat_stop_ids()) and params.stop == ("zebra", *stop_strings)
    assert params.for_chat(tok) == params                                      # idempotent
    # a model that runs on past its reply, skipping the end-of-turn token and opening the next user
    # turn, still ends where its reply ends
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine thanks"},
                                    {"role": "user", "content": "zzz"}], tokenize=False)
    run_on = text[text.index("fine thanks"):text.index("zzz")]
    eot = tok.special_tokens[stop_names[0]] if not stop_strings else None
    detok, shown = Detokenizer(tok, params.stop, params.stop_token_ids), ""
    for t in tok.encode(run_on, allowed_special="all"):
        if t == eot:
            continue                                  # skipped: the role start must stop it alone
        if t in params.stop_token_ids:
            break
        shown += detok.add(t)
        if detok.stopped:
            break
    assert (shown + detok.flush()).rstrip("\n") == "fine thanks"


def test_chat_stops_when_the_model_opens_a_new_turn(hf_folder):
    """A model that writes <|im_start|> (a new turn) instead of <|im_end|> stops there, in `npgpt chat`'s
    session as in the server (test_serve_chat_uses_the_models_template); the control, an ordinary
    token forced the same way, runs to max_new_tokens."""
    from npgpt.cli.sample import ChatSession
    from npgpt.generate import generate_stream
    from npgpt.loading import load_run
    from npgpt.sampling import SamplingParams
    model, tok = load_run(hf_folder)[:2]
    start, plain = tok.special_tokens["<|im_start|>"], tok.encode("the")[0]
    for forced, n_steps, finish in ((start, 1, "stop"), (plain, 5, "length")):
        session = ChatSession(model, tok, params=SamplingParams(temperature=0, max_new_tokens=5,
                                                                logit_bias={forced: 100}))
        session.messages.append({"role": "user", "content": "the fox"})
        steps = [s for st in generate_stream(model, session._prompt_ids(), params=session.params, tokenizer=tok)
                 for s in st]
        assert [s.token for s in steps] == [forced] * n_steps and steps[-1].finish == finish
        if forced == start:
            assert "".join(s.text for s in steps) == ""


# ------------------------------------------------------------------ a Hugging Face folder end to end

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, chatml_tok):
    """A GPT-2-architecture model folder with tokenizer.json and a ChatML template (as a Hub model has)."""
    from npgpt import GPT, GPTConfig
    d = tmp_path_factory.mktemp("hfchat") / "model"
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=128, vocab_size=chatml_tok.vocab_size)
    GPT(cfg).save_pretrained(d)
    chatml_tok.save(d)
    assert not (d / "vocab.json").exists() and (d / "tokenizer.json").is_file()
    return d


def test_saved_folder_keeps_tokenizer_and_template(hf_folder, chatml_tok):
    tok = load(hf_folder)
    assert tok.chat_template == CHATML and tok.fingerprint() == chatml_tok.fingerprint()
    assert tok.eot_id == tok.special_tokens["<|im_end|>"]


def test_chat_cli_uses_the_models_template(hf_folder, chatml_tok):
    from npgpt.cli.sample import ChatSession
    from npgpt.loading import load_run
    model, tok = load_run(hf_folder)[:2]
    session = ChatSession(model, tok, system="Be brief.", max_new_tokens=4, temperature=0.0)
    session.messages.append({"role": "user", "content": "the fox"})
    assert session._prompt_ids() == tok.apply_chat_template(session.messages, add_generation_prompt=True)
    r = CliRunner().invoke(cli, ["chat", "--checkpoint", str(hf_folder), "--max-new-tokens", "4", "--seed", "0"],
                           input="the fox\n/quit\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("bot> ") == 1


@pytest.fixture(scope="module")
def finetuned(hf_folder, tmp_path_factory):
    """`npgpt finetune --init-from <HF folder> --lora-rank 8 --sft chat.jsonl`: (run output, run folder)."""
    d = tmp_path_factory.mktemp("hfft")
    recs = [{"messages": [{"role": "user", "content": f"the {w}"}, {"role": "assistant", "content": f"a {w} dog"}]}
            for w in ("fox", "quick", "lazy", "brown", "jolly", "zebras")]
    f = d / "chat.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in recs) + "\n")
    r = CliRunner().invoke(cli, ["finetune", "--init-from", str(hf_folder), "--lora-rank", "8", "--sft", str(f),
                                 "--out", str(d / "ft"), "--max-iters", "4", "--eval-interval", "2",
                                 "--batch-size", "2", "--set", "eval_iters=1"])
    assert r.exit_code == 0, r.output
    return r.output, d / "ft"


def test_finetune_lora_sft_with_the_models_template(finetuned):
    output, folder = finetuned
    assert "SFT: 6 records" in output and "embedding rows" not in output   # no npgpt chat tokens added
    assert (folder / "ckpt" / "adapter_model.safetensors").is_file()
    r = CliRunner().invoke(cli, ["chat", "--checkpoint", str(folder), "--max-new-tokens", "3"],
                           input="the fox\n/quit\n")
    assert r.exit_code == 0, r.output


def test_serve_chat_uses_the_models_template(finetuned):
    openai = pytest.importorskip("openai")
    from serve_helpers import LiveServer, greedy_reference
    _, folder = finetuned
    tok = load(folder / "ckpt")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lazy dog"}]
    server = LiveServer(folder)
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="ft", messages=msgs, max_tokens=12, temperature=0)
        forced = c.chat.completions.create(model="ft", messages=msgs, max_tokens=12, temperature=0,
                                           logit_bias={str(tok.special_tokens["<|im_start|>"]): 100})
    finally:
        assert server.stop() == 0
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(ids)
    ref, _, _ = greedy_reference(folder, ids, 12, set(tok.chat_stop_ids()))
    assert r.choices[0].message.content == tok.decode(ref)
    # a reply that opens a new turn (<|im_start|>, forced here) stops there: nothing shown, finish "stop"
    assert forced.choices[0].message.content == "" and forced.choices[0].finish_reason == "stop"
    assert forced.usage.completion_tokens == 1


def test_hostile_template_in_a_folder_is_one_clear_error(hf_folder, tmp_path, monkeypatch):
    import shutil
    d = tmp_path / "bad"
    shutil.copytree(hf_folder, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("npgpt.tokenizer.chat_template.MAX_SECONDS", 0.5)
    r = CliRunner().invoke(cli, ["chat", "--checkpoint", str(d)], input="hi\n/quit\n")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "chat template was stopped" in r.output


def test_masks_match_on_random_conversations(chatml_tok):
    from hypothesis import given, settings
    from hypothesis import strategies as st
    content = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cn")), max_size=12)

    @settings(max_examples=30, deadline=None)
    @given(turns=st.lists(st.tuples(content, content), min_size=1, max_size=3))
    def check(turns):
        messages = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        out = chatml_tok.apply_chat_template(messages, return_assistant_tokens_mask=True)
        learned = chatml_tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
        # a token straddling the edge of an assistant span is learned whole, so compare by containment
        expected = "".join(a + "<|im_end|>\n" for _, a in turns)
        assert all(a + "<|im_end|>" in learned for _, a in turns) and len(learned) <= len(expected) + 2 * len(turns) * 4
    check()


# ------------------------------------------------- Llama 3, Qwen2 and SmolLM2-style folders end to end

FAMILIES = {
    # tokenizer: template, added tokens, EOS, BOS, pre-tokenizer, normalizer, BOS post-processor; model
    "llama3": (LLAMA3, LLAMA3_SPECIALS, "<|eot_id|>", "<|begin_of_text|>", "llama3", None, True, {}),
    "qwen2": (QWEN2, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_end|>", None, "qwen2",
              {"type": "NFC"}, False, {"qkv_bias": True, "model_type": "qwen2"}),
    "smollm2": (CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_end|>", "<|im_start|>", "smollm",
                None, False, {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_folder(request, tmp_path_factory):
    """A tiny Llama-architecture folder with the family's tokenizer.json, tokenizer_config.json and template."""
    from npgpt.llama import Llama, LlamaConfig
    template, specials, eos, bos, pre, norm, add_bos, model_kw = FAMILIES[request.param]
    tok = hf_chat_tokenizer(template, specials=specials, eos=eos, bos=bos, pre_tokenizer=pre, normalizer=norm,
                            add_bos=add_bos)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=4, n_kv_head=2, n_embd=32,
                      n_inner=64, **model_kw)
    d = tmp_path_factory.mktemp(request.param) / request.param
    Llama(cfg).save_pretrained(d)
    tok.save(d)
    return request.param, d


def test_family_folder_chats_with_its_template(family_folder):
    from npgpt.cli.sample import ChatSession
    from npgpt.loading import load_run
    name, d = family_folder
    model, tok = load_run(d)[:2]
    assert type(model).__name__ == "Llama" and tok.chat_template == FAMILIES[name][0]
    session = ChatSession(model, tok, max_new_tokens=4, temperature=0.0)
    session.messages.append({"role": "user", "content": "the fox"})
    prompt = session._prompt_ids()
    assert prompt == tok.apply_chat_template(session.messages, add_generation_prompt=True)
    assert tok.decode(prompt).endswith({"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
                                       .get(name, "<|im_start|>assistant\n"))
    assert tok.chat_stop_ids()[0] == tok.special_tokens["<|eot_id|>" if name == "llama3" else "<|im_end|>"]
    r = CliRunner().invoke(cli, ["chat", "--checkpoint", str(d), "--max-new-tokens", "4", "--seed", "0"],
                           input="the fox\n/quit\n")
    assert r.exit_code == 0 and r.output.count("bot> ") == 1, r.output
    # a plain prompt is tokenized as transformers does: Llama 3's tokenizer.json puts BOS first
    bos = [tok.special_tokens["<|begin_of_text|>"]] if name == "llama3" else []
    assert tok.encode_prompt("the fox") == bos + tok.encode("the fox") and tok.encode_prompt("") == bos
    r = CliRunner().invoke(cli, ["sample", "--checkpoint", str(d), "--prompt", "the", "--max-new-tokens", "2",
                                 "--seed", "0"])
    assert r.exit_code == 0, r.output


def test_family_folder_sft_then_serve(family_folder, tmp_path):
    name, d = family_folder
    tok = load(d)
    recs = [{"messages": [{"role": "user", "content": f"the {w}"}, {"role": "assistant", "content": f"a {w} dog"}]}
            for w in ("fox", "quick", "lazy", "brown")]
    data = SFTData.build(tok, recs, block_size=127, val_fraction=0)
    end = "<|eot_id|>" if name == "llama3" else "<|im_end|>\n"
    learned = sorted(tok.decode([t for t in row if t >= 0]) for row in data.rows["train"][1])
    assert learned == sorted(f"a {w} dog{end}" for w in ("fox", "quick", "lazy", "brown"))
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in recs) + "\n")
    r = CliRunner().invoke(cli, ["finetune", "--init-from", str(d), "--sft", str(f), "--out", str(tmp_path / "ft"),
                                 "--max-iters", "3", "--eval-interval", "3", "--batch-size", "2",
                                 "--set", "eval_iters=1"])
    assert r.exit_code == 0, r.output
    assert "SFT: 4 records" in r.output and "embedding rows" not in r.output
    if name != "llama3":
        return                                   # one server start is enough for the suite's time
    openai = pytest.importorskip("openai")
    from serve_helpers import LiveServer, greedy_reference
    msgs = [{"role": "user", "content": "the lazy dog"}]
    server = LiveServer(tmp_path / "ft")
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        reply = c.chat.completions.create(model="ft", messages=msgs, max_tokens=8, temperature=0)
    finally:
        assert server.stop() == 0
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    ref, _, _ = greedy_reference(tmp_path / "ft", ids, 8, set(tok.chat_stop_ids()))
    assert reply.usage.prompt_tokens == len(ids) and reply.choices[0].message.content == tok.decode(ref)
