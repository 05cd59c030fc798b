"""`npgpt sample` and `npgpt chat`: text from a trained model, thin wrappers over npgpt.generate."""

from __future__ import annotations

import sys
import time

import click

from npgpt.cli import job
from npgpt.cli.export import allow_other_base_option, keep_quantized_option
from npgpt.errors import NpgptError


def sampling_options(fn):
    opts = [
        click.option("--max-new-tokens", type=int, default=None, help="Tokens to generate per sample."),
        click.option("--temperature", type=float, default=0.8, show_default=True, help="0 = greedy (argmax)."),
        click.option("--top-k", type=int, default=None, help="Keep only the k most likely tokens."),
        click.option("--top-p", type=float, default=None, help="Nucleus: keep the smallest set with this much probability."),
        click.option("--seed", type=int, default=None, help="Seed for reproducible samples."),
        click.option("--device", default="cpu", show_default=True, help="cpu or gpu."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def control_options(fn):
    """Penalties, logit bias, beam search and speculative decoding flags of `npgpt sample`."""
    opts = [
        click.option("--presence-penalty", type=float, default=0.0, show_default=True,
                     help="Subtract this from the logit of every token already generated (OpenAI's, -2..2)."),
        click.option("--frequency-penalty", type=float, default=0.0, show_default=True,
                     help="Subtract this times a token's count so far from its logit (OpenAI's, -2..2)."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
                     help="Divide positive (multiply negative) logits of tokens seen in prompt or output (CTRL's; 1 = off)."),
        click.option("--logit-bias", multiple=True, metavar="TOKEN=BIAS",
                     help="Add BIAS (-100..100) to a token's logit; TOKEN is an id or a single-token string (repeatable)."),
        click.option("--num-beams", type=int, default=1, show_default=True,
                     help="Beam search with this many beams (>1); prints the best continuation."),
        click.option("--length-penalty", type=float, default=1.0, show_default=True,
                     help="Beam search: finished beams score sum(log p) / length ** this (>1 favours longer)."),
        click.option("--draft", type=click.Path(), default=None,
                     help="Speculative decoding with this small draft model (same tokenizer); same output distribution."),
        click.option("--num-draft", type=int, default=4, show_default=True,
                     help="Speculative decoding: tokens the draft proposes per target forward."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def encode_prompt(tok, text, allow_special=False, option="--prompt"):
    """Prompt text -> ids: ordinary text (specials in it are errors only if the tokenizer says so);
    `allow_special` (the CLI's --allow-special) reads every special token's string as its id."""
    if not text:
        # empty prompt: generation starts from end-of-text, or from the BOS a tokenizer adds (Llama 3's)
        return tok.encode_prompt("")
    if allow_special:
        return tok.encode(text, allowed_special="all")
    try:
        return tok.encode_prompt(text)
    except NpgptError:
        found = sorted((text.find(s), s) for s in tok.special_tokens if s in text)
        if not found:
            raise
        raise NpgptError(f"{option} contains the special token {found[0][1]!r}; add --allow-special to read it as "
                         f"that token, or leave it out") from None


def allow_special_option(fn):
    return click.option("--allow-special", is_flag=True,
                        help="Read special-token strings in the prompt (e.g. <|endoftext|>) as those tokens.")(fn)


def sampling_params(max_new_tokens, temperature, top_k, top_p, seed, **more):
    """The flags -> the one npgpt.sampling.SamplingParams (checked there, as the library and the
    server check theirs)."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.sampling import SamplingParams
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=1.0 if top_p is None else top_p, seed=seed, **more)


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="Run folder or model folder.")
@click.option("--prompt", default=None, help="Text to continue. Empty: start from end-of-text.")
@click.option("--prompt-file", type=click.Path(), default=None, help="Read the prompt from a file.")
@click.option("--num-samples", type=int, default=1, show_default=True, help="Independent samples (batched).")
@click.option("--stream/--no-stream", default=None, help="Print tokens as they come (default: on a TTY).")
@click.option("--show-probs", is_flag=True,
              help="Print each token beside the text before it, with the model's probability, the probability "
                   "it was sampled with (after penalties, temperature, top-k, top-p) and the top-5 alternatives.")
@click.option("--stop", multiple=True, help="Stop a sample when this string appears (repeatable).")
@click.option("--adapter", type=click.Path(), default=None, help="Apply this LoRA adapter folder (unmerged).")
@allow_other_base_option
@click.option("--json-schema", "json_schema", type=click.Path(), default=None,
              help="Constrain the output to JSON valid under this JSON Schema file (README: the supported subset).")
@click.option("--regex", default=None, help="Constrain the output to match this regular expression (whole text).")
@click.option("--choice", multiple=True, help="Constrain the output to exactly one of these strings (repeatable).")
@allow_special_option
@keep_quantized_option
@sampling_options
@control_options
def sample(checkpoint, prompt, prompt_file, num_samples, stream, show_probs, stop, adapter, allow_other_base,
           json_schema, regex, choice, allow_special, keep_quantized, max_new_tokens, temperature, top_k, top_p, seed,
           device, presence_penalty, frequency_penalty, repetition_penalty, logit_bias, num_beams, length_penalty,
           draft, num_draft):
    """Generate text from a trained model."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.generate import generate_stream
    from npgpt.gguf_models import load_options
    from npgpt.loading import load_run
    # checked before loading (the default length is known only after): one SamplingParams, as everywhere
    params = sampling_params(max_new_tokens, temperature, top_k, top_p, seed, stop=tuple(stop),
                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                             repetition_penalty=repetition_penalty)
    if num_samples <= 0:
        raise NpgptError(f"--num-samples must be positive, got {num_samples}")
    if prompt is not None and prompt_file is not None:
        raise NpgptError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        # imported when the command runs: `npgpt --help` does not load every command's modules
        from npgpt.tokenizer import read_text_checked
        prompt = read_text_checked(prompt_file)
    grammar = read_grammar(json_schema, regex, choice)     # checked before the model loads
    model, tok = load_run(checkpoint, adapter=adapter, device=device, trust_pattern=job("trust_pattern", False),
                          allow_other_base=allow_other_base,
                          **load_options(checkpoint, keep_quantized))[:2]
    ids = encode_prompt(tok, prompt or "", allow_special, "--prompt-file" if prompt_file is not None else "--prompt")
    if max_new_tokens is None:     # default: the context's remaining room (past it, every token costs a rebuild),
        room = model.config.block_size - max(len(ids), 1)           # at most 256 (a long-context model)
        params = params.replace(max_new_tokens=max(1, min(room, 256)))
    params = params.replace(logit_bias=parse_logit_bias(tok, logit_bias) or {})
    if grammar is not None:
        # imported when the command runs: `npgpt --help` does not load every command's modules
        from npgpt.structured import token_table
        if num_beams != 1 or draft is not None:
            raise NpgptError("--json-schema / --regex / --choice do not combine with --num-beams or --draft")
        params = params.replace(constraint=grammar.for_tokens(token_table(tok, model.config.vocab_size)),
                                stop_token_ids=(tok.eot_id,))
    if num_beams != 1 or draft is not None:
        return _sample_special(model, tok, ids, prompt, num_samples, params, device, num_beams, length_penalty,
                               draft, num_draft)
    if stream is None:
        stream = sys.stdout.isatty() and num_samples == 1
    rows = [list(ids) for _ in range(num_samples)]
    texts = ["" for _ in rows]
    t0, n_tokens = time.perf_counter(), 0
    if stream and not show_probs:
        click.echo(prompt or "", nl=False)
    for steps in generate_stream(model, rows, params=params, eot_id=tok.eot_id, tokenizer=tok):
        for s in steps:
            n_tokens += 1
            if show_probs:
                alts = "  ".join(f"{_piece(tok, t)} {p:.3f}" for t, p in s.top)
                before = repr(((prompt or "") + texts[s.row])[-24:])
                drawn = "-" if s.sampled is None else f"{s.sampled:.3f}"
                click.echo(f"[{s.row}] {before:>26} + {_piece(tok, s.token):<6} model {s.prob:.3f}  "
                           f"sampled {drawn} | top-5: {alts}")
            elif stream and s.row == 0:
                click.echo(s.text, nl=False)   # whole characters, stop strings held back until decided
            texts[s.row] += s.text
    dt = time.perf_counter() - t0
    if stream and not show_probs:
        click.echo()
    else:
        for i, text in enumerate(texts):
            if num_samples > 1 or show_probs:
                click.echo(f"--- sample {i + 1} ---")
            click.echo((prompt or "") + text)
    click.echo(f"({n_tokens} tokens in {dt:.2f}s, {n_tokens / max(dt, 1e-9):.1f} tokens/s)", err=True)


def read_grammar(json_schema, regex, choice):
    """--json-schema FILE / --regex / --choice -> a compiled npgpt.structured.Grammar, or None."""
    given = [name for name, v in (("--json-schema", json_schema), ("--regex", regex), ("--choice", choice)) if v]
    if not given:
        return None
    if len(given) > 1:
        raise NpgptError(f"give one of {', '.join(given)}, not several")
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.safeio import read_json
    from npgpt.structured import Grammar
    if json_schema:
        return Grammar.json_schema(read_json(json_schema, "JSON schema file"))
    return Grammar.regex(regex) if regex else Grammar.choice(list(choice))


def parse_logit_bias(tok, pairs):
    """['TOKEN=BIAS', ...] -> {id: bias}; TOKEN is an integer id or text that is exactly one token."""
    bias = {}
    for pair in pairs:
        key, sep, val = pair.rpartition("=")
        if not sep or not key:
            raise NpgptError(f"--logit-bias {pair!r}: expected TOKEN=BIAS, e.g. 42=-100 or e=5")
        try:
            b = float(val)
        except ValueError:
            raise NpgptError(f"--logit-bias {pair!r}: bias {val!r} is not a number") from None
        if key.lstrip("-").isdigit():
            t = int(key)
        else:
            ids = encode_prompt(tok, key)
            if len(ids) != 1:
                raise NpgptError(f"--logit-bias {pair!r}: {key!r} is {len(ids)} tokens, not one; give a token id")
            t = ids[0]
        bias[t] = b
    return bias or None


def _sample_special(model, tok, ids, prompt, num_samples, params, device, num_beams, length_penalty, draft,
                    num_draft):
    """`npgpt sample` with --num-beams > 1 (beam search) or --draft (speculative decoding)."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.loading import load_run
    from npgpt.generate import beam_search, speculative_stream
    from npgpt.sampling import Detokenizer
    if num_beams != 1 and draft is not None:
        raise NpgptError("give --num-beams or --draft, not both")
    if num_samples != 1:
        raise NpgptError("--num-beams and --draft decode one sample; drop --num-samples")
    t0 = time.perf_counter()
    if num_beams != 1:
        if params.penalized:
            raise NpgptError("beam search does not take penalties or --logit-bias")
        toks = beam_search(model, ids, params.max_new_tokens, num_beams, length_penalty, eot_id=tok.eot_id)
        detok = Detokenizer(tok, params.stop, [tok.eot_id])
        text = "".join(detok.add(t) for t in toks)
        text += detok.flush()
        extra = f"{num_beams} beams"
    else:
        dmodel, dtok = load_run(draft, device=device, trust_pattern=job("trust_pattern", False))[:2]
        if dtok.vocab_size != tok.vocab_size:
            raise NpgptError(f"--draft {draft}: its tokenizer ({dtok.vocab_size} tokens) differs from the "
                             f"model's ({tok.vocab_size})")
        stats, toks, text, t0 = {}, [], "", time.perf_counter()
        for steps in speculative_stream(model, dmodel, ids, params=params, eot_id=tok.eot_id, tokenizer=tok,
                                        num_draft=num_draft, stats=stats):
            toks += [s.token for s in steps]
            text += "".join(s.text for s in steps)
        rate = stats["accepted"] / max(stats["proposed"], 1)
        extra = (f"speculative: {stats['accepted']}/{stats['proposed']} drafted tokens accepted ({rate:.0%}), "
                 f"{len(toks) / max(stats['rounds'], 1):.2f} tokens per target forward")
    dt = time.perf_counter() - t0
    click.echo((prompt or "") + text)
    click.echo(f"({len(toks)} tokens in {dt:.2f}s, {len(toks) / max(dt, 1e-9):.1f} tokens/s; {extra})", err=True)


def _piece(tok, t):
    return repr(tok.decode([t]))


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A chat model: one with its own chat template (Hugging Face, GGUF), or fine-tuned with --sft.")
@click.option("--system", default=None, help="A system message to start every conversation with.")
@click.option("--adapter", type=click.Path(), default=None, help="Apply this LoRA adapter folder (unmerged).")
@keep_quantized_option
@sampling_options
def chat(checkpoint, system, adapter, keep_quantized, max_new_tokens, temperature, top_k, top_p, seed, device):
    """Talk to a chat model (its own chat template, or npgpt's after `finetune --sft`). /reset clears, /quit leaves."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.gguf_models import load_options
    from npgpt.loading import load_run
    from npgpt.sft import is_chat_model
    params = sampling_params(256 if max_new_tokens is None else max_new_tokens, temperature, top_k, top_p, seed)
    model, tok, ckpt = load_run(checkpoint, adapter=adapter, device=device, trust_pattern=job("trust_pattern", False),
                               **load_options(checkpoint, keep_quantized))[:3]
    if not is_chat_model(tok):
        raise NpgptError(f"{ckpt} is not a chat model (it has no chat template, and its tokenizer lacks npgpt's chat "
                         f"tokens); fine-tune it with `npgpt finetune --sft FILE.jsonl` first")
    session = ChatSession(model, tok, system=system, params=params)
    click.echo("chat: type a message; /reset starts over, /quit leaves.")
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.Abort):
            click.echo()
            break
        cmd = line.strip()
        if cmd in ("/quit", "/exit"):
            break
        if cmd == "/reset":
            session.reset()
            click.echo("(conversation cleared)")
            continue
        if not cmd:
            continue
        click.echo("bot> ", nl=False)
        try:
            for piece in session.reply(line):
                click.echo(piece, nl=False)
        except MessageNotEncodable as e:     # say so, keep the conversation (a broken template still ends it)
            click.echo(f"(not sent: {e})", nl=False)
        click.echo()


class MessageNotEncodable(NpgptError):
    """A chat message holds text the model's tokenizer cannot encode (the turn is refused, not the session)."""


class ChatSession:
    """A conversation in the model's chat template (or npgpt's); history is cropped (oldest turns first) to fit.

    A reply ends at any of the template's turn tokens (SamplingParams.for_chat), not only at its
    end-of-turn: a model that skips <|end|> (<|im_end|>) and starts the next turn's <|user|>
    (<|im_start|>) stops there too.
    params: a SamplingParams, or its settings as keywords (temperature=0, seed=1, ...);
    max_new_tokens applies where params leave it open.
    """

    def __init__(self, model, tok, system=None, params=None, max_new_tokens=256, **settings):
        # imported when the command runs: `npgpt --help` does not load every command's modules
        from npgpt.sampling import SamplingParams
        self.model, self.tok, self.system = model, tok, system
        params = params or SamplingParams(**settings)
        if params.max_new_tokens is None:
            params = params.replace(max_new_tokens=max_new_tokens)
        self.params = params.for_chat(tok)
        self.max_new_tokens = self.params.max_new_tokens
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_ids(self, messages=None):
        # imported when the command runs: `npgpt --help` does not load every command's modules
        from npgpt.sft import render_chat
        budget = self.model.config.block_size - min(self.max_new_tokens, self.model.config.block_size // 2)
        msgs = list(self.messages if messages is None else messages)
        while True:
            ids, _ = render_chat(self.tok, msgs, add_generation_prompt=True)
            first = 1 if msgs and msgs[0]["role"] == "system" else 0
            if len(ids) <= budget or len(msgs) <= first + 1:
                return ids[-budget:]
            del msgs[first]            # drop the oldest turn, keep the system message

    def reply(self, text):
        """Yield the assistant's reply in pieces as it is generated; remember it in the history.

        The history stays encodable: a message the tokenizer cannot encode (a character a char-level
        model never saw) is an NpgptError and is not added, so the next turn works; a reply keeps only
        what encodes back (a decoded token's text need not, e.g. U+FFFD from a cut UTF-8 sequence)."""
        # imported when the command runs: `npgpt --help` does not load every command's modules
        from npgpt.generate import generate_stream
        try:
            self.tok.encode_plain(text)
        except NpgptError as e:
            raise MessageNotEncodable(str(e)) from None
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self._prompt_ids(messages)           # raises before the history changes
        self.messages = messages
        out = []
        for steps in generate_stream(self.model, ids, params=self.params, tokenizer=self.tok):
            for s in steps:
                if s.text:
                    out.append(s.text)
                    yield s.text
        self.messages.append({"role": "assistant", "content": self._encodable("".join(out))})

    def _encodable(self, text):
        try:
            self.tok.encode_plain(text)
            return text
        except NpgptError:              # rare: drop special tokens' text, then what does not encode
            for special in getattr(self.tok, "special_tokens", None) or ():
                text = text.replace(special, "")
            kept = []
            for ch in text:
                try:
                    self.tok.encode_plain(ch)
                    kept.append(ch)
                except NpgptError:
                    pass
            return "".join(kept)


COMMANDS = [sample, chat]
