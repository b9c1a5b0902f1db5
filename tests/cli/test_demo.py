"""lora-llava demo in a real headless browser: upload an image, ask, read the streamed answer and the lineage.

Needs Gradio (the demo extra) and Debian's chromium + chromium-driver (`.ci/run` installs them); without
them the test is skipped and says which is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
def test_the_demo_answers_in_a_browser(trained_run, shapes, tmp_path):
    pytest.importorskip("gradio", reason="the demo extra: pip install 'lora_llava[demo]'")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (in the test extra)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from lora_llava.data.formats import Sample
    from lora_llava.infer import evaluate, load_model

    image = sorted((shapes / "images").glob("eval_*.png"))[0]
    question = "What color is the shape?"
    sample = Sample("m", 0, "a", [("user", f"<image>\n{question}"), ("assistant", "x")], [image])
    expected = evaluate(load_model(trained_run), [sample], 256).predictions[0]["prediction"]

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lora_llava.cli.main", "demo", str(trained_run), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    driver = None
    try:
        end = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.time() < end, "the demo did not start"
                time.sleep(0.5)
        opts = Options()
        opts.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
        driver.find_element(By.CSS_SELECTOR, "#send").click()

        def answer(d):  # type: ignore[no-untyped-def]
            texts = [b.text.strip() for b in d.find_elements(By.CSS_SELECTOR, "#chat .message.bot") if b.text.strip()]
            return texts[-1] if texts else None

        assert wait.until(answer) == expected
        lineage = driver.find_element(By.CSS_SELECTOR, "#lineage").text
        assert "trained 40 steps" in lineage and "vicuna_v1" in lineage
        assert server.poll() is None
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)


def test_the_demo_and_the_card_show_the_same_lineage(trained_run, tmp_path):
    """The demo's lineage panel and a pushed model's card read one lineage: every number the demo shows, for the
    run and for its merged model, is in the card."""
    import json
    import re
    import shutil

    from lora_llava.card import scrub
    from lora_llava.demo import lineage
    from lora_llava.layout import RunDir
    from lora_llava.merging import merge
    from lora_llava.publish import plan_push

    run = RunDir(tmp_path / "run")
    shutil.copytree(trained_run, run.path)
    merge(str(run.path), str(run.merged), log=lambda *_: None)
    run.summary.write_text(json.dumps({"eval_samples": 16, "accuracy": {"base": 0.3125, "adapter": 0.8125,
                                                                        "merged": 0.8125}}))  # fmt: skip
    for ref, merged in ((run.path, False), (run.merged, True)):
        shown = lineage(str(ref))
        card = next(f.content for f in plan_push(str(ref), "me/x").files if f.path_in_repo == "README.md")
        assert isinstance(card, bytes)
        text = card.decode()
        facts, _, data = shown.partition("\n**data**")
        bullets = [ln for ln in facts.splitlines() if ln.startswith("- ")]
        assert any(ln.startswith("- trained 40 steps on ") for ln in bullets), shown
        assert "- eval accuracy: base 0.312, adapter 0.812, merged 0.812" in bullets, shown
        assert any(ln.startswith("- merge verified: ") for ln in bullets) == merged, shown
        for line in bullets:
            for number in re.findall(r"\d+(?:[./]\d+)?", line):
                assert number in text, (number, line, text)
        assert "`tiny`" in shown and "vicuna_v1" in shown and "vicuna_v1" in text
        report = data.strip().removeprefix("```").removesuffix("```").strip()
        assert report and scrub(report) in text  # the data report, local paths scrubbed


# ---------------------------------------------------------------- exposed with --host: uploads bounded, paths scrubbed
# The handler and the launch arguments, tested without a server.


def _png(path, size=(40, 40), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else (200, 30, 30, 128)).save(path)
    return path


def _refusal(respond, image, state=None):
    """The message a question about ``image`` is refused with, as the browser shows it (gradio.Error)."""
    import gradio as gr

    state = state if state is not None else {"image": None, "messages": []}
    with pytest.raises(gr.Error) as e:
        list(respond("What color is the shape?", str(image), [], state, 0.0, 1.0, 8))
    return e.value.message


def test_the_demo_refuses_an_image_over_the_loaders_limits_and_deletes_the_upload(monkeypatch, tmp_path):
    pytest.importorskip("gradio", reason="the demo extra: pip install 'lora_llava[demo]'")
    import warnings

    import lora_llava.data.images as images
    from lora_llava.demo import respond_fn

    uploads = tmp_path / "gradio"
    respond = respond_fn(loaded=None, uploads=uploads)  # type: ignore[arg-type]  # refused before the model is used

    monkeypatch.setattr(images, "MAX_FILE_BYTES", 10)
    big = _png(uploads / "0123abcd" / "big.png")
    size = big.stat().st_size
    message = _refusal(respond, big)
    assert message == f"this image cannot be used: image file is {size} bytes, over the 10-byte cap"
    assert not big.exists()  # refused: deleted at once
    monkeypatch.undo()

    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    wide = _png(uploads / "4567ef01" / "wide.png", size=(12, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns from MAX_PIXELS, refuses from twice that
        message = _refusal(respond, wide)
    assert message == "this image cannot be used: image is 12x12 pixels, over the 100-pixel limit"
    assert not wide.exists()

    elsewhere = _png(tmp_path / "mine" / "photo.png", size=(12, 12))  # not in the upload folder: never deleted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "over the 100-pixel limit" in _refusal(respond, elsewhere)
    assert elsewhere.exists()


def test_errors_the_demo_shows_name_no_server_path(monkeypatch, tmp_path):
    pytest.importorskip("gradio", reason="the demo extra: pip install 'lora_llava[demo]'")
    import lora_llava.demo as demo

    uploads = tmp_path / "srv" / "gradio"
    respond = demo.respond_fn(loaded=None, uploads=uploads)  # type: ignore[arg-type]
    broken = uploads / "89ab" / "broken.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a png")
    message = _refusal(respond, broken)
    assert message.startswith("this image cannot be used: not a readable image")
    assert str(tmp_path) not in message and "/srv/" not in message, message
    assert "&lt;local&gt;/broken.png" in message  # scrubbed, and escaped: Gradio renders the message as HTML

    # the image of a conversation deleted by age: said in words
    gone = str(uploads / "cdef" / "gone.png")
    assert _refusal(respond, gone, {"image": gone, "messages": []}) == demo.GONE

    # an error raised while answering (here: the model's files), whatever its type
    class Failing:
        def __init__(self, *args, **kwargs):
            self.image = None
            self.messages = []

        def stream(self, question):
            raise OSError(f"[Errno 5] cannot read '{tmp_path}/models/x/adapter_model.safetensors'")
            yield ""

    monkeypatch.setattr(demo, "ChatSession", Failing)
    image = _png(uploads / "0011" / "ok.png")
    message = _refusal(respond, image)
    assert message == "OSError: [Errno 5] cannot read '&lt;local&gt;/adapter_model.safetensors'", message


def test_the_demo_handler_streams_answers_about_an_upload_it_keeps(trained_run, shapes, tmp_path):
    pytest.importorskip("gradio", reason="the demo extra: pip install 'lora_llava[demo]'")
    import shutil

    from lora_llava.demo import respond_fn
    from lora_llava.infer import load_model

    uploads = tmp_path / "gradio"
    image = uploads / "abcd" / "shape.png"
    image.parent.mkdir(parents=True)
    shutil.copy(sorted((shapes / "images").glob("eval_*.png"))[0], image)
    respond = respond_fn(load_model(trained_run), uploads)
    state = {"image": None, "messages": []}
    *_, (history, box, state) = respond("What color is the shape?", str(image), [], state, 0.0, 1.0, 4)
    assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"] and box == ""
    assert state["image"] == str(image) and len(state["messages"]) == 2
    *_, (history, _, state) = respond("And its shape?", str(image), history, state, 0.0, 1.0, 4)
    assert len(history) == 4 and len(state["messages"]) == 4  # the same image: the same conversation
    assert image.exists()  # an accepted upload stays while its conversation may go on


def test_the_demo_launches_with_bounded_uploads_in_a_folder_removed_at_exit(monkeypatch, capsys, tmp_path):
    """lora-llava demo --host: what it passes to Gradio's launch, and where uploads go (no server started)."""
    gr = pytest.importorskip("gradio", reason="the demo extra: pip install 'lora_llava[demo]'")
    import os
    import types

    from gradio.data_classes import ImageData
    from helpers import run_cli

    import lora_llava.cli.common as common
    import lora_llava.demo as demo
    import lora_llava.infer as infer

    monkeypatch.setattr(
        infer, "load_model", lambda ref, quantize=False: types.SimpleNamespace(kind="backbone", ref=ref)
    )
    monkeypatch.setattr(demo, "lineage", lambda ref: "lineage")
    monkeypatch.setattr(common, "cpu_threads_for", lambda backbone: None)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "shared"))
    seen = {}

    def launch(self, **kwargs):  # instead of serving: what a visitor's upload would meet
        folder = os.environ["GRADIO_TEMP_DIR"]
        upload = _png(Path(folder) / "0123" / "photo.png", mode="RGBA")
        image = next(b for b in self.blocks.values() if isinstance(b, gr.Image))
        seen.update(
            kwargs=kwargs, folder=Path(folder), mode=Path(folder).stat().st_mode & 0o777,
            delete_cache=self.delete_cache, cache=image.GRADIO_CACHE,
            preprocessed=image.preprocess(ImageData(path=str(upload), orig_name="photo.png")), upload=str(upload),
        )  # fmt: skip
        return None, "", ""

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    code, out, err = run_cli(capsys, "demo", "tiny", "--host", "0.0.0.0", "--port", "7861")
    assert code == 0, err
    assert out == "demo of backbone tiny at http://0.0.0.0:7861 (Ctrl-C stops it)\n"
    assert seen["kwargs"] == {
        "server_name": "0.0.0.0", "server_port": 7861, "share": False, "show_error": False, "quiet": True,
        "max_file_size": 64 * 1024 * 1024,
    }  # fmt: skip
    folder = seen["folder"]
    assert folder.name.startswith("lora-llava-demo-") and seen["mode"] == 0o700 and seen["cache"] == str(folder)
    assert seen["delete_cache"] == demo.DELETE_UPLOADS == (600, 3600)
    assert seen["preprocessed"] == seen["upload"]  # the upload as it is: load_image checks it before any decoding
    assert not folder.exists()  # removed at exit, with the upload in it
    assert os.environ["GRADIO_TEMP_DIR"] == str(tmp_path / "shared")  # restored
