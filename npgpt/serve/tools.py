"""Tool calls on the chat endpoint: OpenAI's `tools`, `tool_choice`, assistant messages with
`tool_calls` and `role: tool` messages in; the reply's tool calls out, in OpenAI's shape, whole or
as they stream.

The prompt. A model whose own chat template takes `tools` (it mentions them, as Qwen2's does) gets
the conversation as OpenAI sends it: the tool list as `tools`, tool calls on assistant messages
(arguments as objects, which templates print with `tojson`), tool messages as `role: tool`.
Otherwise npgpt renders its documented fallback, the Hermes-style format that Qwen2 and SmolLM2
templates use:

  * a system message (before the conversation's own system text) that lists the tools:
        # Tools
        You may call one or more functions to assist with the user query. You are provided with
        function signatures within <tools></tools> XML tags:
        <tools>
        {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}
        </tools>
        For each function call, return a json object with function name and arguments within
        <tool_call></tool_call> XML tags:
        <tool_call>
        {"name": <function-name>, "arguments": <args-json-object>}
        </tool_call>
  * an assistant message's tool calls appended to its text as such <tool_call> blocks;
  * tool results as a user message of <tool_response>\n...\n</tool_response> blocks.

The reply. Every `<tool_call>{json}</tool_call>` block whose JSON names one of the tools becomes a
tool call ({"id", "type": "function", "function": {"name", "arguments": JSON text}}); the rest of
the text is the message's content (None when only calls remain) and the finish reason becomes
"tool_calls". A block that does not parse stays text. `tool_choice` "required" or a named function
constrains decoding (npgpt.structured) to exactly one such block, with arguments valid under the
function's `parameters` schema; "none" leaves the tools out of the prompt and parses nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from npgpt.errors import NpgptError
from npgpt.serve.protocol import ApiError
from npgpt.sft import render_chat
from npgpt.structured import Grammar, GrammarError

MAX_TOOLS = 64
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
NO_PARAMETERS = {"type": "object", "properties": {}}

FALLBACK_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query. You are provided "
                 "with function signatures within <tools></tools> XML tags:\n<tools>")
FALLBACK_TAIL = ("</tools>\n\nFor each function call, return a json object with function name and arguments "
                 "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                 "\"arguments\": <args-json-object>}\n</tool_call>")


@dataclass
class ToolSpec:
    """A request's tools: the list as OpenAI sends it (checked), each function's parameters schema by
    name, and the choice: "auto", "none", "required" or a function's name."""
    tools: list
    parameters: dict
    choice: str

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")

    @property
    def active(self) -> bool:
        return self.choice != "none"


def parse_tools(body) -> ToolSpec | None:
    """`tools` and `tool_choice` of a chat body -> a ToolSpec, or None without tools (400s on bad shapes)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ApiError(400, f"'tools' must be a list of at most {MAX_TOOLS} tools", "tools")
    params, clean = {}, []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.fullmatch(fn["name"]):
            raise ApiError(400, "each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': "
                                "{...}}}, the name of letters, digits, '_', '.', '-' (at most 64)", "tools")
        if fn["name"] in params:
            raise ApiError(400, f"tool {fn['name']!r} is listed twice", "tools")
        schema = fn.get("parameters", NO_PARAMETERS)
        if not isinstance(schema, dict):
            raise ApiError(400, f"tool {fn['name']!r}: 'parameters' must be a JSON schema object", "tools")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ApiError(400, f"tool {fn['name']!r}: 'description' must be a string", "tools")
        params[fn["name"]] = schema
        clean.append({"type": "function", "function": {k: fn[k] for k in ("name", "description", "parameters")
                                                         if k in fn}})
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in params:      # a list or object name is a 400, not a TypeError
            raise ApiError(400, "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', "
                                "'function': {'name': NAME}} naming one of the tools", "tool_choice")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise ApiError(400, "'tool_choice' must be 'none', 'auto', 'required' or a named function", "tool_choice")
    return ToolSpec(clean, params, choice)


# ---- messages and the prompt -----------------------------------------------------------------------
def _text(content, what):
    if content is None:
        return ""
    if isinstance(content, list):         # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, "message content parts must be {'type': 'text', 'text': ...}", "messages")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{what} must be text", "messages")
    return content


def _arguments(text):
    """A tool call's arguments (JSON text, as OpenAI sends them) -> the object templates print."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return text
    return value


def clean_messages(msgs) -> list[dict]:
    """OpenAI's messages -> {"role", "content"[, "tool_calls"][, "tool_call_id"]} dicts (400 on bad shapes).
    Roles: system (developer), user, assistant (content may be null beside tool_calls), tool."""
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict):
            raise ApiError(400, "each message must be an object with 'role' and 'content'", "messages")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"unsupported message role {m.get('role')!r}; use system, user, assistant or tool",
                           "messages")
        calls = m.get("tool_calls") if role == "assistant" else None
        if m.get("content") is None and not calls and role != "assistant":
            raise ApiError(400, f"a {role} message needs text 'content'", "messages")
        clean = {"role": role, "content": _text(m.get("content"), f"a {role} message's content")}
        if calls is not None:
            if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
                raise ApiError(400, "'tool_calls' must be a list of calls", "messages")
            clean["tool_calls"] = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                        or not isinstance(fn.get("arguments", ""), str):
                    raise ApiError(400, "each tool call must be {'id': ..., 'type': 'function', 'function': "
                                        "{'name': ..., 'arguments': JSON text}}", "messages")
                clean["tool_calls"].append({"id": str(c.get("id", "")), "type": "function", "function": {
                    "name": fn["name"], "arguments": _arguments(fn.get("arguments", "{}"))}})
        if role == "tool":
            if not out or not (out[-1]["role"] == "tool" or out[-1].get("tool_calls")):
                raise ApiError(400, "a message with role 'tool' must answer a preceding assistant message's "
                                    "'tool_calls'", "messages")
            clean["tool_call_id"] = str(m.get("tool_call_id", ""))
        out.append(clean)
    return out


def template_takes_tools(tok) -> bool:
    """Whether the model's own chat template renders tools and tool messages."""
    source = getattr(tok, "chat_template", None)
    return isinstance(source, str) and "tools" in source and "tool" in source


def _call_block(call):
    fn = call["function"]
    return OPEN + "\n" + json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False) \
        + "\n" + CLOSE


def fallback_messages(messages, spec: ToolSpec | None) -> list[dict]:
    """The conversation in npgpt's Hermes-style fallback (module doc): system / user / assistant only."""
    out = []
    if spec is not None and spec.active:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in spec.tools)
        head = f"{FALLBACK_HEAD}\n{listing}\n{FALLBACK_TAIL}"
        if messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + head})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": head})
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_response"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_response": True})
            continue
        content = m["content"]
        if m.get("tool_calls"):
            content = "\n".join(([content] if content else []) + [_call_block(c) for c in m["tool_calls"]])
        out.append({"role": m["role"], "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def render_prompt(tok, messages, spec: ToolSpec | None) -> list[int]:
    """The prompt's ids: the model's template with tools when it takes them, else the fallback."""
    plain = spec is None and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    try:
        if plain:
            return render_chat(tok, [{"role": m["role"], "content": m["content"]} for m in messages],
                               add_generation_prompt=True)[0]
        if template_takes_tools(tok):
            tools = spec.tools if spec is not None and spec.active else None
            return tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        return render_chat(tok, fallback_messages(messages, spec), add_generation_prompt=True)[0]
    except NpgptError as e:                  # the model's template refused the conversation, or its budget ran out
        raise ApiError(400, str(e), "messages") from None


def forced_grammar(spec: ToolSpec) -> Grammar:
    """The grammar of a forced reply: one <tool_call> block of the named (or any) tool."""
    names = list(spec.parameters) if spec.choice == "required" else [spec.choice]
    try:
        return Grammar.tool_call({n: spec.parameters[n] for n in names})
    except GrammarError as e:
        raise ApiError(400, f"tools: {e}", "tools", code="unsupported_grammar") from None


# ---- the reply -----------------------------------------------------------------------------------------
def _call(block_json, spec):
    """The JSON inside one <tool_call> block -> an OpenAI tool call, or None if it is not one."""
    try:
        obj = json.loads(block_json)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in spec.parameters:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_reply(text, spec: ToolSpec):
    """A whole reply -> (content or None, [tool calls])."""
    calls, rest, at = [], [], 0
    for m in BLOCK.finditer(text):
        call = _call(m.group(1), spec)
        if call is None:
            continue
        calls.append(call)
        rest.append(text[at:m.start()])
        at = m.end()
    rest.append(text[at:])
    content = "".join(rest).strip() if calls else text
    return (content or None), calls


class ToolStream:
    """A reply's tool calls as its text streams: `feed(delta)` and `finish()` return events
    ("content", text) and ("call", tool call); text that may begin a <tool_call> block is held back
    until the block closes (then it is a call, or text again if it does not parse)."""

    def __init__(self, spec: ToolSpec):
        self.spec, self.buf, self.inside, self.calls = spec, "", False, 0

    def feed(self, delta):
        self.buf += delta
        out = []
        while True:
            if not self.inside:
                i = self.buf.find(OPEN)
                if i < 0:
                    keep = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1)
                                 if OPEN.startswith(self.buf[-k:])), 0)
                    cut = len(self.buf) - keep
                    if cut:
                        out.append(("content", self.buf[:cut]))
                    self.buf = self.buf[cut:]
                    return out
                if i:
                    out.append(("content", self.buf[:i]))
                self.buf, self.inside = self.buf[i:], True
            j = self.buf.find(CLOSE)
            if j < 0:
                return out
            block, self.buf, self.inside = self.buf[:j + len(CLOSE)], self.buf[j + len(CLOSE):], False
            call = _call(block[len(OPEN):-len(CLOSE)].strip(), self.spec)
            if call is None:
                out.append(("content", block))
            else:
                call["index"] = self.calls       # the call's place in the reply (delta.tool_calls[].index)
                self.calls += 1
                out.append(("call", call))

    def finish(self):
        out = [("content", self.buf)] if self.buf else []
        self.buf = ""
        return out
