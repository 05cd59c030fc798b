"""The chat page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): type a message, see a streamed reply, see probability colouring and the alternatives
on hover. A screenshot is saved under the test's temporary folder."""

import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from npgpt.sft import CHAT_TOKENS, render_chat  # noqa: E402

from serve_helpers import LiveServer, greedy_reference, model_folder  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")]

KEY = "sk-browser-test"


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,800",
              f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    yield drv
    drv.quit()


def test_chat_page_streams_and_colours_tokens(tmp_path, browser):
    folder = model_folder(tmp_path / "tiny-chat", chat=True, block=128)
    # a message whose greedy reply (what the page must show at temperature 0) is a few tokens long
    for message in ("the quick brown fox", "hello", "over a lazy dog", "jolly", "wizards", "a", "b", "c"):
        from npgpt.tokenizer import load
        tok = load(folder)
        ids, _ = render_chat(tok, [{"role": "user", "content": message}], add_generation_prompt=True)
        stops = {tok.special_tokens[t] for t in CHAT_TOKENS} | {tok.eot_id}
        ref, _, _ = greedy_reference(folder, ids, 40, stops)
        if len(ref) >= 4:
            break
    expected = tok.decode(ref)
    server = LiveServer(folder, "--api-key", KEY)
    try:
        b = browser
        b.get(server.url + "/")
        wait = WebDriverWait(b, 30)
        b.find_element(By.ID, "key").send_keys(KEY)
        b.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        wait.until(lambda d: "(chat)" in d.find_element(By.ID, "model").text)
        b.find_element(By.ID, "max_tokens").clear()
        b.find_element(By.ID, "max_tokens").send_keys("40")
        b.find_element(By.ID, "temperature").clear()
        b.find_element(By.ID, "temperature").send_keys("0")
        b.find_element(By.ID, "input").send_keys(message)
        b.find_element(By.ID, "send").click()
        reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".assistant[data-state=done]"))
        user = b.find_element(By.CSS_SELECTOR, ".msg.user")
        assert user.text == message
        assert not b.find_elements(By.CSS_SELECTOR, ".msg.error")
        tokens = reply.find_elements(By.CSS_SELECTOR, "span.tok")
        assert tokens, reply.get_attribute("outerHTML")
        # each token is coloured by its probability (red = unlikely ... green = likely)
        probs = [float(t.get_attribute("data-prob")) for t in tokens]
        assert all(0 < p <= 1 for p in probs)
        colours = {t.value_of_css_property("background-color") for t in tokens}
        assert all(c not in ("rgba(0, 0, 0, 0)", "transparent") for c in colours)
        assert len(colours) > 1                        # different probabilities, different colours
        # hovering shows the top alternatives
        ActionChains(b).move_to_element(tokens[0]).perform()
        tip = b.find_element(By.ID, "tip")
        wait.until(lambda d: tip.is_displayed())
        assert "top alternatives" in tip.text and len(tip.text.splitlines()) >= 3
        b.save_screenshot(str(tmp_path / "chat.png"))
        assert (tmp_path / "chat.png").stat().st_size > 1000
        # the reply arrived as a stream of server-sent events, rendered piece by piece
        assert int(reply.get_attribute("data-chunks")) > 1
        assert b.execute_script("return arguments[0].textContent", reply) == expected
        # a second turn keeps the history and also works
        b.find_element(By.ID, "input").send_keys("and again\n")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-state=done]")) == 2)
        # turning colouring off hides it
        b.find_element(By.ID, "colour").click()
        assert tokens[0].value_of_css_property("background-color") in ("rgba(0, 0, 0, 0)", "transparent")
    finally:
        assert server.stop() == 0


def test_chat_page_fits_a_small_context(tmp_path, browser):
    """The quick start's model has a 64-token context: the page's default request must fit it, a long
    conversation drops its oldest turns (and says so), no reply bubble is left empty, and the hover
    list of alternatives is ordered by probability."""
    folder = model_folder(tmp_path / "ctx64", chat=True, block=64)
    server = LiveServer(folder)
    try:
        b = browser
        b.get(server.url + "/")
        wait = WebDriverWait(b, 60)
        wait.until(lambda d: "(chat)" in d.find_element(By.ID, "model").text)
        assert int(b.find_element(By.ID, "max_tokens").get_attribute("value")) <= 32   # capped from 128
        messages = ["tell me about the quick brown fox", "and about the lazy dog", "and the wizards", "jolly"]
        for n, m in enumerate(messages, 1):
            b.find_element(By.ID, "input").send_keys(m + "\n")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-state=done]")) == n)
        assert not b.find_elements(By.CSS_SELECTOR, ".msg.error"), b.find_element(By.ID, "log").text
        bubbles = b.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        assert len(bubbles) == 4 and all(x.text.strip() for x in bubbles)
        notes = [x.text for x in b.find_elements(By.CSS_SELECTOR, ".note")]
        assert notes and all("dropped to fit the model's 64-token context" in t for t in notes)
        # the message box sits at the bottom of the window, below the conversation
        box = b.find_element(By.ID, "input").rect
        assert box["y"] + box["height"] > 0.8 * b.execute_script("return window.innerHeight")
        # alternatives: most likely first
        tokens = b.find_elements(By.CSS_SELECTOR, "span.tok")
        assert tokens
        for t in tokens[:10]:
            tip = t.get_attribute("data-tip").splitlines()
            ps = [float(line.split()[0]) for line in tip[2:]]
            assert len(ps) >= 2 and ps == sorted(ps, reverse=True), tip
        # the API key box shows its whole hint
        key = b.find_element(By.ID, "key")
        assert b.execute_script("const k = arguments[0]; const c = document.createElement('canvas').getContext('2d');"
                                "c.font = getComputedStyle(k).font; return c.measureText(k.placeholder).width < k.clientWidth;",
                                key)
    finally:
        assert server.stop() == 0
