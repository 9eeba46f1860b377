"""serve.py in a real headless browser (Debian's Chromium driven by Selenium), as a person uses it.

One server for the module: a LoRA adapter of a tiny checkpoint as --model (its base from adapter_config.json) and
the tiny checkpoint itself as --compare. The page's streamed answers must equal predict.py's for the same inputs and
settings; bad inputs show a message and the server keeps serving; two tabs keep their own conversations; a bug while
building the page (a second server, whose page-building fails once) leaves the tab free for the next question; a
model folder that does not load stops serve.py at start-up with one line. A screenshot of the page with its answers
is left in outputs/test-artifacts/serve.png.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import torch
from conftest import write_test_media
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # predict.py is a top-level script, not in a package

import predict  # noqa: E402
from phi3v import inference  # noqa: E402

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)", allow_module_level=True)

LIMIT = 8192  # the test model's max_position_embeddings: a prompt over it fits in a browser's text box
ARTIFACTS = os.path.join(ROOT, "outputs", "test-artifacts")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The models (base and a LoRA adapter of it that changes its answers) and the files a user drops."""
    from phi3v import Phi3VForCausalLM
    from phi3v.model_setup import apply_lora, lora_target_modules
    from phi3v.tiny import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("serve")
    base = write_tiny_checkpoint(folder / "base", num_crops=4, max_position_embeddings=LIMIT)
    torch.manual_seed(0)
    peft_model = apply_lora(Phi3VForCausalLM.from_pretrained(base), 4, 8, 0.0,
                            lora_target_modules(Phi3VForCausalLM.from_pretrained(base), vision=False))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # a trained adapter: not the no-op it starts as
            torch.nn.init.normal_(parameter, std=0.05)
    peft_model.save_pretrained(folder / "adapter")  # no processor files: they come from the base
    assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == base

    write_test_media(folder)
    (folder / "notes.txt").write_text("not a picture")
    (folder / "cut.jpg").write_bytes((folder / "red.jpg").read_bytes()[:300])  # a truncated JPEG
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return {"base": base, "adapter": str(folder / "adapter"), **{
        name: str(folder / name) for name in ("red.jpg", "blue.png", "clip.mp4", "notes.txt", "cut.jpg", "broken.mp4")
    }}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(files, code=None):
    """serve.py running on a free port, as a person starts it (or `code`, which ends by calling serve.main); its URL."""
    port = _free_port()
    flags = ["--model", files["adapter"], "--compare", files["base"],
             "--port", str(port), "--num_crops", "1", "--max_new_tokens", "12"]
    command = [sys.executable, "serve.py", *flags] if code is None else [sys.executable, "-c", code, *flags]
    log = tempfile.TemporaryFile()
    # Without PYTEST_CURRENT_TEST: NiceGUI would take the server for its own test harness's.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**env, "NICEGUI_STORAGE_PATH": tempfile.mkdtemp()})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                log.seek(0)
                pytest.fail(f"serve.py did not start:\n{log.read().decode()[-3000:]}")
            time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def server(files):
    with serving(files) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager is not used (explicit paths); no stats
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="phi3v-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def models(files):
    """The two served models, loaded here as predict.py loads them (for multi-turn expectations)."""
    return {name: inference.load_for_inference(files[name]) for name in ("adapter", "base")}


# ------------------------------------------------------------------------------------------------ the page
class Page:
    """What a person does on the page: drop files, type, press Send, read what is shown."""

    def __init__(self, driver, url):
        self.driver = driver
        driver.get(url)
        self.wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".question textarea"))
        # Every text an answer shows, in order, to see it stream in.
        driver.execute_script("""
            window.seen = [];
            new MutationObserver(() => document.querySelectorAll('.phi3v-answer').forEach(
                (e, i) => window.seen.push([i, e.textContent]))).observe(
                document.body, {subtree: true, childList: true, characterData: true});""")

    def wait_for(self, condition, timeout=120):
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: condition())
        except TimeoutException:
            shows = self.driver.find_element(By.TAG_NAME, "body").text
            raise AssertionError(f"page did not get there in {timeout} s; it shows:\n{shows}") from None

    def text(self, selector):
        return "\n".join(e.get_attribute("textContent") for e in self.driver.find_elements(By.CSS_SELECTOR, selector))

    def set_number(self, css_class, value):
        field = self.driver.find_element(By.CSS_SELECTOR, f".{css_class} input")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(value), Keys.TAB)

    def drop(self, *paths, error=None):
        """Drop files on the upload box; they are attached, or the message with `error` and the file name shows."""
        before = self.text(".attached")
        self.driver.find_element(By.CSS_SELECTOR, ".upload input[type=file]").send_keys("\n".join(paths))
        if error is None:
            self.wait_for(lambda: all(os.path.basename(p) in self.text(".attached") for p in paths))
        else:
            self.wait_for(lambda: error in self.text(".phi3v-error")
                          and all(os.path.basename(p) in self.text(".phi3v-error") for p in paths))
            assert self.text(".attached") == before  # nothing bad was attached

    def ask(self, question, error=None):
        """Type a question and press Send: the (fine-tuned, base) answers, or wait for the message with `error`."""
        done = len(self.driver.find_elements(By.CSS_SELECTOR, ".phi3v-answer.phi3v-done"))
        box = self.driver.find_element(By.CSS_SELECTOR, ".question textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)  # what an earlier question that was refused left in the box
        if len(question) > 200:  # paste, as a person would (typing key by key takes minutes)
            self.driver.execute_script(
                "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));", box, question)
        else:
            box.send_keys(question)
        self.driver.find_element(By.CSS_SELECTOR, ".send").click()
        if error is not None:
            self.wait_for(lambda: error in self.text(".phi3v-error"))
            return
        columns = len(self.driver.find_elements(By.CSS_SELECTOR, ".conversation"))
        self.wait_for(lambda: len(self.driver.find_elements(By.CSS_SELECTOR, ".phi3v-answer.phi3v-done"))
                      == done + columns and self.text(".status") == "ready")
        return self.answers()[-1]

    def answers(self):
        """[(fine-tuned answer, base answer) per turn]."""
        columns = [[e.get_attribute("textContent") for e in column.find_elements(By.CSS_SELECTOR, ".phi3v-answer")]
                   for column in self.driver.find_elements(By.CSS_SELECTOR, ".conversation")]
        return list(zip(*columns))

    def new_chat(self):
        self.driver.find_element(By.CSS_SELECTOR, ".new-chat").click()
        self.wait_for(lambda: not self.driver.find_elements(By.CSS_SELECTOR, ".phi3v-answer"))


def predict_answer(model, question, *media, tokens=12, crops=1, frames=None):
    flags = ["--video", media[0], "--num_frames", str(frames)] if frames else [a for m in media for a in ("--image", m)]
    return predict.main(["--model", model, "--prompt", question, *flags,
                         "--max_new_tokens", str(tokens), "--num_crops", str(crops)])


# ------------------------------------------------------------------------------------------------ tests
def test_streamed_answers_equal_predict_py_base_beside_fine_tuned(server, browser, files, models):
    page = Page(browser, server)
    page.set_number("max-new-tokens", 16)  # the page's settings are the ones used
    page.drop(files["red.jpg"])
    shown = page.ask("What colour is it?")
    expected = (predict_answer(files["adapter"], "What colour is it?", files["red.jpg"], tokens=16),
                predict_answer(files["base"], "What colour is it?", files["red.jpg"], tokens=16))
    assert shown == expected
    assert expected[0] != expected[1]  # the adapter changed the answer, and each column shows its own model's

    # It streamed: the fine-tuned column showed growing beginnings of its answer before the whole of it.
    seen = [text.strip() for column, text in browser.execute_script("return window.seen") if column == 0]
    partial = {text for text in seen if text and text != expected[0] and expected[0].startswith(text)}
    assert len(partial) >= 2, seen

    # A second turn keeps the first turn's image; the answer is the shared path's for the whole conversation.
    from phi3v.inference import GenerationSettings, answer, conversation

    shown = page.ask("Is it bright?")
    settings = GenerationSettings(max_new_tokens=16, num_crops=1)
    image = Image.open(files["red.jpg"]).convert("RGB")
    for column, name in enumerate(("adapter", "base")):
        messages = conversation([("What colour is it?", 1, expected[column]), ("Is it bright?", 0, None)])
        assert shown[column] == answer(*models[name], messages, [image], settings)
    os.makedirs(ARTIFACTS, exist_ok=True)
    browser.save_screenshot(os.path.join(ARTIFACTS, "serve.png"))

    # A video: its frames (the number set on the page) become the images, as predict.py --video --num_frames.
    page.new_chat()
    page.set_number("num-frames", 3)
    page.set_number("max-new-tokens", 12)
    page.drop(files["clip.mp4"])
    assert "clip.mp4 (3 frames)" in page.text(".attached")
    assert page.ask("What happens?") == (predict_answer(files["adapter"], "What happens?", files["clip.mp4"], frames=3),
                                         predict_answer(files["base"], "What happens?", files["clip.mp4"], frames=3))


def test_bad_inputs_show_a_message_and_the_server_keeps_serving(server, browser, files):
    page = Page(browser, server)
    page.drop(files["notes.txt"], error="not an image file")
    page.drop(files["cut.jpg"], error="corrupt or truncated image")
    page.drop(files["broken.mp4"], error="video")
    page.ask("   ", error="type a question first")

    page.drop(files["red.jpg"], files["blue.png"])
    page.ask("<|image_1|> Which one?", error="the prompt has 1 image tag(s) but 2 image(s) were given")
    page.ask("hello " * LIMIT, error=f"longer than the model's limit of {LIMIT} tokens")
    # Over 1 MB of text (more than any Phi-3-V takes: 128k tokens) does not leave the browser: NiceGUI says so.
    popup = page.driver.find_element(By.ID, "too_long_message_popup")
    assert popup.get_attribute("aria-hidden") == "true"
    box = page.driver.find_element(By.CSS_SELECTOR, ".question textarea")
    page.driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));", box, "hello " * 200_000)
    page.wait_for(lambda: popup.get_attribute("aria-hidden") == "false")
    assert "too long" in popup.get_attribute("textContent").lower()
    assert not page.answers()  # nothing was asked of the models

    shown = page.ask("Which is red?")  # the two images are still attached; the server still answers
    assert shown == (predict_answer(files["adapter"], "Which is red?", files["red.jpg"], files["blue.png"]),
                     predict_answer(files["base"], "Which is red?", files["red.jpg"], files["blue.png"]))
    assert page.text(".phi3v-error") == ""

    # Sampling on (no fixed answer to compare with: it must answer, in both columns); Enter sends too.
    page.driver.find_element(By.CSS_SELECTOR, ".do-sample").click()
    page.set_number("temperature", 0.7)
    done = len(page.driver.find_elements(By.CSS_SELECTOR, ".phi3v-answer.phi3v-done"))
    page.driver.find_element(By.CSS_SELECTOR, ".question textarea").send_keys("And now?", Keys.ENTER)
    page.wait_for(lambda: len(page.driver.find_elements(By.CSS_SELECTOR, ".phi3v-answer.phi3v-done")) == done + 2
                  and page.text(".status") == "ready")
    assert len(page.answers()) == 2 and not page.driver.find_elements(By.CSS_SELECTOR, ".phi3v-failed")
    assert page.text(".phi3v-error") == ""


def test_two_tabs_keep_their_own_conversations(server, browser, files):
    first = Page(browser, server)
    first.drop(files["red.jpg"])
    first_tab = browser.current_window_handle
    browser.switch_to.new_window("tab")
    second = Page(browser, server)
    second.drop(files["blue.png"])
    second.driver.find_element(By.CSS_SELECTOR, ".question textarea").send_keys("Describe the blue one.")
    browser.switch_to.window(first_tab)
    first.driver.find_element(By.CSS_SELECTOR, ".question textarea").send_keys("Describe the red one.")
    first.driver.find_element(By.CSS_SELECTOR, ".send").click()
    browser.switch_to.window(browser.window_handles[-1])
    second.driver.find_element(By.CSS_SELECTOR, ".send").click()  # while the first tab's answer is generating
    second.wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".phi3v-done")) == 2)
    assert "Describe the red one." not in second.text("body")
    assert second.answers() == [(predict_answer(files["adapter"], "Describe the blue one.", files["blue.png"]),
                                 predict_answer(files["base"], "Describe the blue one.", files["blue.png"]))]
    browser.close()
    browser.switch_to.window(first_tab)
    first.wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".phi3v-done")) == 2)
    assert "Describe the blue one." not in first.text("body")
    assert first.answers() == [(predict_answer(files["adapter"], "Describe the red one.", files["red.jpg"]),
                                predict_answer(files["base"], "Describe the red one.", files["red.jpg"]))]


def test_a_model_folder_that_does_not_load_fails_at_start_up_with_one_line(tmp_path, files):
    import serve

    with pytest.raises(SystemExit) as error:  # the checks of the folder that come before any weights are read
        serve.load_slots(serve.parse_args(["--model", files["base"], "--compare", str(tmp_path / "gone")]))
    assert error.value.code == 2
    assert str(error.value) == (f"{os.path.basename(sys.argv[0])}: error: --compare {tmp_path / 'gone'}: "
                                f"{tmp_path / 'gone'}: no such model folder")

    folder = tmp_path / "run"  # weights that do not read: the whole program, as a person starts it
    shutil.copytree(files["base"], folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    result = subprocess.run([sys.executable, "serve.py", "--model", str(folder), "--port", str(_free_port())],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    expected = f"serve.py: error: --model {folder} does not load: Error while deserializing header: header too large"
    assert result.stderr.strip().splitlines() == [expected]


# serve.py, whose page-building (the question and the answers' places in each column) fails the first time.
FAILS_ONCE = """
import sys
import serve
show_question = serve.Chat.show_question
def fail_once(self, *args):
    serve.Chat.show_question = show_question
    raise RuntimeError("no room for  the\\nanswer")
serve.Chat.show_question = fail_once
serve.main(sys.argv[1:])
"""


def test_a_failure_while_building_the_page_leaves_the_tab_free_for_the_next_question(files, browser):
    with serving(files, FAILS_ONCE) as url:
        page = Page(browser, url)
        page.ask("First?", error="failed: no room for the answer (the server's log has the traceback)")
        page.wait_for(lambda: page.text(".status") == "ready")
        shown = page.ask("Second?")  # the same tab: answered, not refused as busy
        assert all(shown) and not page.driver.find_elements(By.CSS_SELECTOR, ".phi3v-failed")
        assert len(page.answers()) == 1 and page.text(".phi3v-error") == ""
