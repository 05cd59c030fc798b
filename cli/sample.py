"""`npgpt sample` and `npgpt chat`: text from a trained model, thin wrappers over npgpt.generate."""

from __future__ import annotations

import sys
import time

import click

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


def encode_prompt(tok, text):
    """Prompt text -> ids: ordinary text (specials in it are errors only if the tokenizer says so)."""
    if not text:
        return []          # empty prompt: generation starts from end-of-text
    return tok.encode_prompt(text)


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="Run folder or model folder.")
@click.option("--prompt", default=None, help="Text to continue. Empty: start from end-of-text.")
@click.option("--prompt-file", type=click.Path(), default=None, help="Read the prompt from a file.")
@click.option("--num-samples", type=int, default=1, show_default=True, help="Independent samples (batched).")
@click.option("--stream/--no-stream", default=None, help="Print tokens as they come (default: on a TTY).")
@click.option("--show-probs", is_flag=True, help="Print each token's probability and the top-5 alternatives.")
@click.option("--stop", multiple=True, help="Stop a sample when this string appears (repeatable).")
@sampling_options
def sample(checkpoint, prompt, prompt_file, num_samples, stream, show_probs, stop, max_new_tokens,
           temperature, top_k, top_p, seed, device):
    """Generate text from a trained model."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.evaluate import load_model_and_tokenizer
    from npgpt.generate import check_sampling_args, generate_stream
    max_new_tokens = 200 if max_new_tokens is None else max_new_tokens
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if num_samples <= 0:
        raise NpgptError(f"--num-samples must be positive, got {num_samples}")
    if prompt is not None and prompt_file is not None:
        raise NpgptError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        # imported when the command runs: `npgpt --help` does not load every command's modules
        from npgpt.tokenizer import read_text_checked
        prompt = read_text_checked(prompt_file)
    model, tok, _ = load_model_and_tokenizer(checkpoint, device)
    ids = encode_prompt(tok, prompt or "")
    if stream is None:
        stream = sys.stdout.isatty() and num_samples == 1
    rows = [list(ids) for _ in range(num_samples)]
    generated = [[] for _ in rows]
    shown = 0                                  # characters of sample 0 already streamed
    t0, n_tokens = time.perf_counter(), 0
    if stream and not show_probs:
        click.echo(prompt or "", nl=False)
    for steps in generate_stream(model, rows, max_new_tokens, temperature, top_k, top_p, seed,
                                 stop=list(stop) or None, eot_id=tok.eot_id, tokenizer=tok):
        for s in steps:
            n_tokens += 1
            generated[s.row].append(s.token)
            if show_probs:
                alts = "  ".join(f"{_piece(tok, t)} {p:.3f}" for t, p in s.top)
                click.echo(f"[{s.row}] {_piece(tok, s.token)} p={s.prob:.3f} | top-5: {alts}")
            elif stream:
                # decode the whole tail so multi-byte characters split over tokens print whole
                text = _body(tok, generated[0], stop)
                if not text.endswith("\ufffd"):
                    click.echo(text[shown:], nl=False)
                    shown = len(text)
    dt = time.perf_counter() - t0
    if stream and not show_probs:
        click.echo(_body(tok, generated[0], stop)[shown:])
    else:
        for i, toks in enumerate(generated):
            if num_samples > 1 or show_probs:
                click.echo(f"--- sample {i + 1} ---")
            click.echo((prompt or "") + _body(tok, toks, stop))
    click.echo(f"({n_tokens} tokens in {dt:.2f}s, {n_tokens / max(dt, 1e-9):.1f} tokens/s)", err=True)


def _body(tok, toks, stop):
    """Generated text without the end-of-text token and anything from a stop string on."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.generate import cut_at_stop
    text = tok.decode([t for t in toks if t != tok.eot_id])
    return cut_at_stop(text, list(stop)) if stop else text


def _piece(tok, t):
    return repr(tok.decode([t]))


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="An SFT (chat) model folder.")
@click.option("--system", default=None, help="A system message to start every conversation with.")
@sampling_options
def chat(checkpoint, system, max_new_tokens, temperature, top_k, top_p, seed, device):
    """Talk to a chat model (fine-tuned with `npgpt finetune --sft`). /reset clears, /quit leaves."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.evaluate import load_model_and_tokenizer
    from npgpt.generate import check_sampling_args
    from npgpt.sft import CHAT_TOKENS
    max_new_tokens = 256 if max_new_tokens is None else max_new_tokens
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    model, tok, ckpt = load_model_and_tokenizer(checkpoint, device)
    missing = [t for t in CHAT_TOKENS if t not in tok.special_tokens]
    if missing:
        raise NpgptError(f"{ckpt} is not a chat model (its tokenizer lacks {', '.join(missing)}); "
                         f"fine-tune it with `npgpt finetune --sft FILE.jsonl` first")
    session = ChatSession(model, tok, system=system, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
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
        for piece in session.reply(line):
            click.echo(piece, nl=False)
        click.echo()


class ChatSession:
    """A conversation in the chat template; history is cropped (oldest turns first) to fit."""

    def __init__(self, model, tok, system=None, max_new_tokens=256, **sampling):
        self.model, self.tok, self.system = model, tok, system
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_ids(self):
        # imported when the command runs: `npgpt --help` does not load every command's modules
        from npgpt.sft import render_chat
        budget = self.model.config.block_size - min(self.max_new_tokens, self.model.config.block_size // 2)
        msgs = list(self.messages)
        while True:
            ids, _ = render_chat(self.tok, msgs, add_generation_prompt=True)
            first = 1 if msgs and msgs[0]["role"] == "system" else 0
            if len(ids) <= budget or len(msgs) <= first + 1:
                return ids[-budget:]
            del msgs[first]            # drop the oldest turn, keep the system message

    def reply(self, text):
        """Yield the assistant's reply in pieces as it is generated; remember it in the history."""
        # imported when the command runs: `npgpt --help` does not load every command's modules
        from npgpt.generate import generate_stream
        self.messages.append({"role": "user", "content": text})
        end = self.tok.special_tokens["<|end|>"]
        out = []
        for steps in generate_stream(self.model, self._prompt_ids(), self.max_new_tokens, eot_id=end,
                                     **self.sampling):
            for s in steps:
                if s.token in (end, self.tok.eot_id):
                    break
                out.append(s.token)
                yield self.tok.decode([s.token])
            else:
                continue
            break
        self.messages.append({"role": "assistant", "content": self.tok.decode(out)})


COMMANDS = [sample, chat]
