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
