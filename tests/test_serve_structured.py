"""Structured outputs and tool calls through `npgpt serve`, talked to by the official `openai` client. The
model is tiny and random: the constraint, not the model, makes every output parse and validate."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

openai = pytest.importorskip("openai")

from npgpt import GPT, GPTConfig  # noqa: E402

from chat_templates import QWEN2  # noqa: E402
from helpers import corpus, hf_chat_tokenizer  # noqa: E402
from serve_helpers import LiveServer  # noqa: E402
from structured_helpers import JSON_TEXT, random_schema, validate  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "required": ["a", "b"],
                                  "properties": {"a": {"type": "integer"}, "b": {"type": "number"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny random GPT with a byte-level BPE tokenizer and a Qwen2-style template that takes tools."""
    d = tmp_path_factory.mktemp("structured") / "tiny-tools"
    tok = hf_chat_tokenizer(QWEN2, text=corpus(300) + JSON_TEXT)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=1, n_head=2, n_embd=32), seed=0)
    for p in m.parameters():
        if p.data.ndim > 1:
            p.data *= 3.0
    m.save_pretrained(d)
    tok.save(d)
    s = LiveServer(d, "--max-batch", "8")
    yield s
    assert s.stop() == 0


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_json_schema_output_validates_for_20_random_schemas(server):
    c = client(server)

    def one(seed):
        schema = random_schema(np.random.default_rng(seed))
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "json please"}],
                                      max_tokens=40, temperature=1.0, seed=seed, response_format={
                                          "type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
        text = r.choices[0].message.content
        return schema, text, r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(20)))
    for schema, text, reason in results:
        assert validate(json.loads(text), schema), (schema, text)
        assert reason in ("stop", "length")


def test_json_object_streamed_and_regex_and_choice(server):
    c = client(server)
    chunks = c.chat.completions.create(model="m", messages=ASK, max_tokens=50, seed=1, stream=True,
                                       response_format={"type": "json_object"})
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert isinstance(json.loads(text), dict)
    r = c.completions.create(model="m", prompt="call me at ", max_tokens=12, seed=2,
                             extra_body={"guided_regex": r"\d{3}-[a-z]{2,4}"})
    assert re.fullmatch(r"\d{3}-[a-z]{2,4}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="m", messages=ASK, max_tokens=8, seed=3, n=3,
                                  extra_body={"guided_choice": ["sunny", "rain", "snow storm"]})
    assert all(ch.message.content in ("sunny", "rain", "snow storm") for ch in r.choices)


@pytest.mark.parametrize("kwargs, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "string", "pattern": "^a+$"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "integer", "minimum": 3}}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"extra_body": {"guided_regex": "(a)\\1"}}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "object", "required": ["a_long_name", "b"], "properties": {
            "a_long_name": {"type": "string", "minLength": 20}, "b": {"type": "boolean"}}}}}, "max_tokens": 10},
     "max_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "format": "email"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])
def test_unsupported_or_unfit_requests_are_400(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="m", messages=ASK, **{"max_tokens": 30, **kwargs})
    assert e.value.body["param"] == param and e.value.body["message"]


def test_forced_tool_call_returns_valid_arguments(server):
    c = client(server)
    r = c.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, ADD], max_tokens=120, seed=4,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    for seed in range(5, 9):
        r = c.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, ADD], max_tokens=120, seed=seed,
                                      tool_choice="required", temperature=1.0)
        call = r.choices[0].message.tool_calls[0]
        fn = {"get_weather": WEATHER, "add": ADD}[call.function.name]["function"]
        assert validate(json.loads(call.function.arguments), fn["parameters"])


def test_streamed_tool_calls_reassemble(server):
    c = client(server)
    args = dict(model="m", messages=ASK, tools=[WEATHER, ADD], tool_choice="required", max_tokens=120, seed=11)
    whole = c.chat.completions.create(**args).choices[0].message.tool_calls[0]
    calls, reasons = {}, []
    for ch in c.chat.completions.create(stream=True, **args):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
            slot["id"] = slot["id"] or tc.id
            slot["name"] += (tc.function.name or "") if tc.function else ""
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        reasons.append(ch.choices[0].finish_reason)
    assert list(calls) == [0] and reasons[-1] == "tool_calls"
    assert calls[0]["name"] == whole.function.name and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.function.arguments)


def test_tool_history_and_tool_choice_none(server):
    c = client(server)
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    r = c.chat.completions.create(model="m", messages=history, tools=[WEATHER], max_tokens=5, seed=0,
                                  tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.usage.prompt_tokens > 100
    with pytest.raises(openai.BadRequestError):     # a tool result must answer a call
        c.chat.completions.create(model="m", messages=ASK + [{"role": "tool", "content": "x"}], max_tokens=3)


# ---- the prompt and the reply, without a server ------------------------------------------------------
HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]


def test_prompt_uses_the_template_with_tools_else_the_fallback():
    from npgpt.serve import tools
    from npgpt.sft import ensure_chat_tokens
    from structured_helpers import bpe_tokenizer
    spec = tools.parse_tools({"tools": [WEATHER]})
    msgs = tools.clean_messages(HISTORY)
    qwen = hf_chat_tokenizer(QWEN2, text=corpus(300) + JSON_TEXT)
    expected = qwen.apply_chat_template(msgs, add_generation_prompt=True, tools=[WEATHER], tokenize=False)
    assert qwen.decode(tools.render_prompt(qwen, msgs, spec)) == expected
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in expected
    plain = bpe_tokenizer()                        # npgpt's own chat format: no template, the fallback
    ensure_chat_tokens(plain)
    text = plain.decode(tools.render_prompt(plain, msgs, spec))
    assert text.startswith("<|system|># Tools\n") and json.dumps(WEATHER) in text
    assert ('<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
            '\n</tool_call><|end|><|user|><tool_response>\n18 degrees, sunny\n</tool_response><|end|><|assistant|>'
            ) in text
    none = tools.parse_tools({"tools": [WEATHER], "tool_choice": "none"})
    assert "# Tools" not in plain.decode(tools.render_prompt(plain, msgs, none))


PIECES = ["Sure. ", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2.5}}\n</tool_call>',
          '<tool_call>{"name": "get_weather", "arguments": {"city": "Nice", "unit": "celsius"}}</tool_call>',
          '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "<tool_call>{not json</tool_call>",
          "<tool", "\n", "a < b", "</tool_call>"]


@given(st.lists(st.sampled_from(PIECES), max_size=6), st.lists(st.integers(0, 200), max_size=8))
def test_streamed_calls_equal_whole_reply_calls(pieces, cuts):
    from npgpt.serve import tools
    spec = tools.parse_tools({"tools": [WEATHER, ADD]})
    text = "".join(pieces)
    content, calls = tools.parse_reply(text, spec)
    stream, events, at = tools.ToolStream(spec), [], 0
    for cut in sorted({min(c, len(text)) for c in cuts}) + [len(text)]:
        events += stream.feed(text[at:cut])
        at = cut
    events += stream.finish()
    got = [v["function"] for k, v in events if k == "call"]
    assert got == [c["function"] for c in calls]
    streamed = "".join(v for k, v in events if k == "content")
    assert (streamed.strip() or None) == content if calls else streamed == text


@pytest.mark.slow
def test_chat_page_shows_tool_calls(server, tmp_path):
    """The chat page (a real headless Chromium) sends its tools, shows the streamed call, and sends the
    next message as the tool's result."""
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1100,800",
              f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    b = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=opts)
    try:
        b.get(server.url + "/")
        wait = WebDriverWait(b, 60)
        wait.until(lambda d: "(chat)" in d.find_element(By.ID, "model").text)
        b.find_element(By.ID, "tools").send_keys(json.dumps([WEATHER]))
        Select(b.find_element(By.ID, "tool_choice")).select_by_visible_text("required")
        b.find_element(By.ID, "input").send_keys("weather in Paris?\n")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".assistant[data-state=done]"))
        assert not b.find_elements(By.CSS_SELECTOR, ".msg.error")
        box = b.find_element(By.CSS_SELECTOR, ".assistant .toolcall").text
        name, args = re.fullmatch(r"tool call: (\w+)\((.*)\)", box, re.DOTALL).groups()
        assert name == "get_weather" and validate(json.loads(args), WEATHER["function"]["parameters"])
        Select(b.find_element(By.ID, "tool_choice")).select_by_visible_text("none")
        b.find_element(By.ID, "input").send_keys("18 degrees\n")       # sent as the tool's result
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-state=done]")) == 2)
        assert b.find_element(By.CSS_SELECTOR, ".msg.tool").text == "tool result: 18 degrees"
        assert not b.find_elements(By.CSS_SELECTOR, ".msg.error")
    finally:
        b.quit()
