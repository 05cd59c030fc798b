"""A model's own chat template: Jinja, rendered in a bounded sandbox as transformers renders it.

Hugging Face models carry their conversation format as a Jinja template (`chat_template` in
tokenizer_config.json, or chat_template.jinja; GGUF files as `tokenizer.chat_template`). The
template sees `messages` (a list of {"role", "content", ...}), `add_generation_prompt`, `tools`,
`documents`, the tokenizer's `bos_token` / `eos_token` / `pad_token` strings and any extra
variables, and returns the prompt text:

    ChatTemplate(source).render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    -> "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"            (ChatML)

The environment is the one transformers builds: jinja2's ImmutableSandboxedEnvironment (no access
to Python internals, no mutating list or dict methods) with trim_blocks, lstrip_blocks, the
loop-controls extension (`break`, `continue`), a `tojson` filter that does not escape HTML,
`raise_exception(message)`, `strftime_now(format)`, and the `{% generation %}` tag that marks the
assistant's text for training masks.

A template is a stranger's program, and the sandbox alone does not stop one that runs for an hour or
builds a string of a terabyte. Every render therefore gets a budget (`max_chars` of output and of
any string or list it builds, `max_seconds` of time): the template's syntax tree is rewritten so
every `for` loop and every `~` concatenation passes through a check, every call, attribute lookup
and `+ * % **` on strings, lists or numbers is checked by the sandbox's hooks, and the filters and
string methods that take a width or repeat text are given bounded versions. A template that exceeds
its budget, raises, or is not valid Jinja gives one NpgptError naming what happened.

`assistant_spans` finds the characters each assistant message adds (for SFT masks): the
`{% generation %}` blocks when the template has them, else by rendering the conversation prefix by
prefix; `chat_ids_and_mask` turns that into token ids and a per-token mask. `turn_markers` finds
what the template writes between turns (its end-of-turn and role tokens), where a reply stops.
"""

from __future__ import annotations

import json
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import regex
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from npgpt.errors import NpgptError

MAX_CHARS = 1 << 22          # output, and any string or list built on the way (real prompts: kB)
MAX_SECONDS = 5.0            # real templates render in milliseconds
MAX_INT_BITS = 1 << 12       # numbers a template computes (a 4096-bit number is already absurd)
MAX_SOURCE_CHARS = 1 << 20

_LOOP_GUARD = "__npgpt_loop__"
_CONCAT_GUARD = "__npgpt_concat__"
_WIDE_FORMAT = regex.compile(r"\d{7,}")       # a width or precision of a million characters or more


class _Budget:
    """What one render may still spend; `tick` is called from every hook."""

    def __init__(self, max_chars: int, max_seconds: float):
        self.max_chars = max_chars
        self.deadline = time.monotonic() + max_seconds
        self.max_seconds = max_seconds
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks & 63 == 0 and time.monotonic() > self.deadline:
            raise _OverBudget(f"it ran for more than {self.max_seconds:g} s")

    def size(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise _OverBudget(f"it built {what} of {n:,} items, more than {self.max_chars:,}")


class _OverBudget(Exception):
    pass


_BUDGET: ContextVar[_Budget | None] = ContextVar("npgpt_chat_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:                 # called outside `render` (a template object used directly)
        raise _OverBudget("it was rendered without a budget; use ChatTemplate.render")
    return budget


def _length(x) -> int | None:
    return len(x) if isinstance(x, (str, list, tuple)) else None


# ------------------------------------------------------------------------------ the environment

class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records where the assistant's text lands in the output."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

    def _generation(self, caller):
        text = caller()
        state = _SPANS.get()
        if state is not None:
            blocks, spans = state
            start = sum(map(len, blocks))
            spans.append((start, start + len(text)))
        return text


_SPANS: ContextVar[tuple[list, list] | None] = ContextVar("npgpt_generation_spans", default=None)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with every hook also charging the render's budget."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        budget = _budget()
        budget.tick()
        # str.format comes wrapped by the sandbox (functools.wraps keeps the bound method as __wrapped__)
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(owner, str):
            _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs, budget)
        result = super().call(__context, __obj, *args, **kwargs)
        n = _length(result)
        if n is not None:
            budget.size(n, "a string or list")
        return result

    def getattr(self, obj, attribute):
        _budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _budget().tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        budget = _budget()
        budget.tick()
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * max(abs(left).bit_length(), 1) > MAX_INT_BITS:
                raise _OverBudget(f"it computed {left} ** {right}, a number of more than {MAX_INT_BITS} bits")
        elif operator == "*":
            n_left, n_right = _length(left), _length(right)
            if n_left is not None and isinstance(right, int):
                budget.size(n_left * right, "a repeated string or list")
            elif n_right is not None and isinstance(left, int):
                budget.size(n_right * left, "a repeated string or list")
            elif isinstance(left, int) and isinstance(right, int) and \
                    abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
                raise _OverBudget(f"it computed a product of more than {MAX_INT_BITS} bits")
        elif operator == "+":
            n_left, n_right = _length(left), _length(right)
            if n_left is not None and n_right is not None:
                budget.size(n_left + n_right, "a joined string or list")
        elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise _OverBudget("it formatted text with a width of a million characters or more")
        return super().call_binop(context, operator, left, right)


def _check_str_method(s: str, name: str, args, kwargs, budget: _Budget) -> None:
    """Bound what a string method called from a template can build before it builds it."""
    for value in (*args, *kwargs.values()):      # center / ljust / zfill / expandtabs widths
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > budget.max_chars:
            raise _OverBudget(f"it passed the number {value} to str.{name} (more than {budget.max_chars:,})")
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = len(s) + 1 if not args[0] else s.count(args[0])
        budget.size(len(s) + count * len(args[1]), "a replaced string")
    elif name == "join" and args:
        items = args[0]
        if isinstance(items, (list, tuple)):
            budget.size(sum(len(x) for x in items if isinstance(x, str)) + len(s) * len(items), "a joined string")
    elif name in ("format", "format_map") and _WIDE_FORMAT.search(s):
        raise _OverBudget("it formatted text with a width of a million characters or more")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: Jinja's own escapes HTML characters, which no prompt wants
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _loop_guard(iterable):
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


def _concat_guard(*parts):
    budget = _budget()
    text = "".join(str(p) for p in parts)
    budget.size(len(text), "a concatenated string")
    return text


def _bounded_filter(name, original, size_of):
    """`original` with its result's size checked before it is built. jinja2 hands some filters the
    environment or eval context first (marked by `jinja_pass_arg`); the size function skips it."""
    passes = getattr(original, "jinja_pass_arg", None)

    def bounded(*args, **kwargs):
        budget = _budget()
        budget.tick()
        plain = args[1:] if passes is not None else args
        if name == "join" and plain and not isinstance(plain[0], (str, list, tuple)):
            plain = (list(plain[0]), *plain[1:])           # a generator: read it once, here
            args = (*args[:len(args) - len(plain)], *plain)
        budget.size(size_of(*plain, **kwargs), f"the result of the {name} filter")
        return original(*args, **kwargs)
    if passes is not None:
        bounded.jinja_pass_arg = passes
    return bounded


def _width(value, width=80, *args, **kwargs):
    return max(len(str(value)), width if isinstance(width, int) else 0)


def _indent_size(value, width=4, *args, **kwargs):
    text = str(value)
    w = width if isinstance(width, int) else len(str(width))
    return len(text) + (text.count("\n") + 1) * w


def _replace_size(value, old, new, count=None):
    text, old, new = str(value), str(old), str(new)
    n = len(text) + 1 if not old else text.count(old)
    return len(text) + n * len(new)


def _format_size(value, *args, **kwargs):
    if _WIDE_FORMAT.search(str(value)):
        return 1 << 62
    return len(str(value)) + sum(len(str(a)) for a in args) + sum(len(str(v)) for v in kwargs.values())


def _join_size(value, d="", attribute=None):
    return sum(len(str(x)) for x in value) + len(str(d)) * len(value)


def _bounded_lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 (jinja2's names)
    if not all(isinstance(v, int) and 0 <= v <= 100 for v in (n, min, max)):
        raise _OverBudget("it asked lipsum for more than 100 paragraphs or words")
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


def _guard_tree(tree: nodes.Node) -> nodes.Node:
    """Route every for loop's iterable and every `~` concatenation through a budget check."""
    for loop in list(tree.find_all(nodes.For)):
        loop.iter = nodes.Call(nodes.Name(_LOOP_GUARD, "load"), [loop.iter], [], None, None)
    for parent in [tree, *tree.find_all(nodes.Node)]:
        for field in parent.fields:
            value = getattr(parent, field, None)
            if isinstance(value, nodes.Concat):
                setattr(parent, field, _concat_call(value))
            elif isinstance(value, list):
                setattr(parent, field, [_concat_call(v) if isinstance(v, nodes.Concat) else v for v in value])
    return tree


def _concat_call(node: nodes.Concat) -> nodes.Call:
    return nodes.Call(nodes.Name(_CONCAT_GUARD, "load"), list(node.nodes), [], None, None)


@lru_cache(maxsize=1)
def _environment() -> _BoundedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    for name, size_of in (("center", _width), ("indent", _indent_size), ("replace", _replace_size),
                          ("format", _format_size), ("join", _join_size), ("wordwrap", _width)):
        env.filters[name] = _bounded_filter(name, env.filters[name], size_of)
    env.globals.update({"raise_exception": _raise_exception, "strftime_now": _strftime_now,
                        "lipsum": _bounded_lipsum, _LOOP_GUARD: _loop_guard, _CONCAT_GUARD: _concat_guard})
    return env


@lru_cache(maxsize=64)
def _compile(source: str):
    env = _environment()
    try:
        tree = env.parse(source)
        has_generation = any(isinstance(block.call.node, nodes.ExtensionAttribute)
                             and block.call.node.name == "_generation" for block in tree.find_all(nodes.CallBlock))
        return env.from_string(_guard_tree(tree)), has_generation
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise NpgptError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
    except (jinja2.exceptions.TemplateError, SyntaxError, RecursionError, ValueError, TypeError) as e:
        # Jinja accepts some templates whose Python does not compile ({% break %} outside a loop)
        raise NpgptError(f"the chat template is not valid Jinja ({type(e).__name__}: {str(e)[:200]})") from None


# --------------------------------------------------------------------------------- rendering

@dataclass
class ChatTemplate:
    """A compiled chat template and its budget per render."""

    source: str
    max_chars: int | None = None          # None: MAX_CHARS / MAX_SECONDS as they are when it is made
    max_seconds: float | None = None

    def __post_init__(self):
        self.max_chars = MAX_CHARS if self.max_chars is None else self.max_chars
        self.max_seconds = MAX_SECONDS if self.max_seconds is None else self.max_seconds
        if not isinstance(self.source, str):
            raise NpgptError(f"a chat template must be a string, got {type(self.source).__name__}")
        if len(self.source) > MAX_SOURCE_CHARS:
            raise NpgptError(f"the chat template is {len(self.source):,} characters, more than {MAX_SOURCE_CHARS:,}")
        self._template, self.has_generation_blocks = _compile(self.source)

    def render(self, messages, add_generation_prompt: bool = False, tools=None, documents=None,
               **variables) -> str:
        """The prompt text for `messages` (see the module docstring for the variables)."""
        return self._render(messages, add_generation_prompt, tools, documents, variables)[0]

    def render_with_spans(self, messages, add_generation_prompt=False, tools=None, documents=None,
                          **variables) -> tuple[str, list[tuple[int, int]]]:
        """(text, [(start, end) of each {% generation %} block's output])."""
        return self._render(messages, add_generation_prompt, tools, documents, variables)

    def _render(self, messages, add_generation_prompt, tools, documents, variables):
        if not isinstance(messages, (list, tuple)):
            raise NpgptError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
        budget = _Budget(self.max_chars, self.max_seconds)
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        budget_token, spans_token = _BUDGET.set(budget), _SPANS.set((blocks, spans))
        total = 0
        try:
            for block in self._template.generate(messages=list(messages), tools=tools, documents=documents,
                                                 add_generation_prompt=bool(add_generation_prompt), **variables):
                total += len(block)
                budget.size(total, "an output")
                budget.tick()
                blocks.append(block)
        except _OverBudget as e:
            raise NpgptError(f"the chat template was stopped: {e}; a real template needs far less, so this one "
                             f"is broken or hostile") from None
        except jinja2.exceptions.SecurityError as e:
            raise NpgptError(f"the chat template tried something the sandbox forbids ({e})") from None
        except jinja2.exceptions.TemplateError as e:
            raise NpgptError(f"the chat template refused the conversation: {e}") from None
        except RecursionError:
            raise NpgptError("the chat template recursed too deeply; it is broken or hostile") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
            raise NpgptError(f"the chat template failed on this conversation ({type(e).__name__}: {e})") from None
        finally:
            _BUDGET.reset(budget_token)
            _SPANS.reset(spans_token)
        return "".join(blocks), spans


# ------------------------------------------------------------------------------- training masks

def assistant_spans(template: ChatTemplate, messages, variables: dict) -> tuple[str, list[tuple[int, int]]]:
    """(text of the whole conversation, character spans of what each assistant message adds).

    With `{% generation %}` blocks the spans are theirs. Otherwise each assistant message's span is
    the text it adds: the conversation up to it rendered with the generation prompt, then up to and
    including it; the difference (its content and the end-of-turn marker) is what the model learns.
    """
    text, spans = template.render_with_spans(messages, **variables)
    if template.has_generation_blocks:
        return text, spans
    spans = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True, **variables)
        upto = template.render(messages[:i + 1], **variables)
        if not upto.startswith(before):
            before = template.render(messages[:i], **variables)     # a template with no generation prompt
        if not upto.startswith(before) or not text.startswith(upto):
            raise NpgptError(f"the chat template renders earlier turns differently once message {i + 1} is added, "
                             f"so the assistant's text cannot be found by prefixes; give the template "
                             f"{{% generation %}} blocks around the assistant's text")
        spans.append((len(before), len(upto)))
    return text, spans


def token_mask(tok, text: str, ids: list[int], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token of `ids` (the encoding of `text`): whether it overlaps one of the character `spans`."""
    pieces = [tok.token_bytes(i) for i in ids]
    if b"".join(pieces) != text.encode("utf-8"):
        raise NpgptError("the tokenizer changes this text while encoding it (a normalizer, a prefix space, or a "
                         "token that swallows whitespace), so token positions cannot be matched to the assistant's "
                         "characters")
    # character index -> byte offset, at each span edge
    def byte_at(char_index: int) -> int:
        return len(text[:char_index].encode("utf-8"))
    byte_spans = [(byte_at(a), byte_at(b)) for a, b in spans if b > a]
    mask, pos = [], 0
    for piece in pieces:
        start, end = pos, pos + len(piece)
        mask.append(any(start < b and a < end for a, b in byte_spans))
        pos = end
    return mask


def end_of_turn(template: ChatTemplate, specials, variables: dict) -> str | None:
    """The special token the template writes right after an assistant message's text (ChatML's
    `<|im_end|>`, Llama 3's `<|eot_id|>`), or None when it writes none there."""
    marker = "npgpt-end-of-turn-probe"
    for messages in ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                     [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": marker}]):
        try:
            text = template.render(messages, **variables)
        except NpgptError:
            continue
        at = text.rfind(marker)
        if at < 0:
            continue
        after = text[at + len(marker):].lstrip()
        return next((name for name in sorted(specials, key=len, reverse=True) if after.startswith(name)), None)
    return None


# npgpt's own chat format (npgpt.sft.render_chat, for models without a template): one token per role
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
MAX_MARKER_CHARS = 64        # a plain-text role marker longer than this is not taken as one


def turn_markers(template: ChatTemplate, specials, variables: dict) -> tuple[list[str], list[str]]:
    """What the template writes between two messages and before the reply, where a model that writes
    it has ended its turn or begun a new one: (special token names in order of appearance, plain-text
    markers). ChatML: <|im_end|>, <|im_start|>; Llama 3: <|eot_id|>, <|start_header_id|>,
    <|end_header_id|>. A template that marks turns with plain text only ("User: ") gives that text,
    stripped (at most MAX_MARKER_CHARS), as a marker instead.

    Found by rendering a conversation of probe messages (system, user, assistant, user, assistant;
    without the system message when the template refuses one) and reading what lies between them."""
    roles = ("system", "user", "assistant", "user", "assistant")
    probes = [f"npgpt-turn-probe-{i}" for i in range(len(roles))]
    names = sorted(specials, key=len, reverse=True)
    special_re = regex.compile("|".join(regex.escape(n) for n in names)) if names else None
    for first in (0, 1):
        messages = [{"role": r, "content": p} for r, p in zip(roles[first:], probes[first:])]
        try:
            text = template.render(messages, **variables)
            prompt = template.render(messages[:-1], add_generation_prompt=True, **variables)
        except NpgptError:
            continue
        gaps, end = [], None
        for m in messages:
            at = text.find(m["content"], end or 0)
            if at < 0:
                break
            if end is not None:
                gaps.append(text[end:at])
            end = at + len(m["content"])
        else:
            at = prompt.rfind(probes[-2])               # the generation prompt: the reply's own header
            if at >= 0:
                gaps.append(prompt[at + len(probes[-2]):])
            found, texts = [], []
            for gap in gaps:
                here = [mt.group() for mt in special_re.finditer(gap)] if special_re else []
                found += here
                if not here and gap.strip() and len(gap.strip()) <= MAX_MARKER_CHARS:
                    texts.append(gap.strip())
            return list(dict.fromkeys(found)), list(dict.fromkeys(texts))
    return [], []
