"""lora-llava chat: piped questions, commands, saving a conversation, and in a terminal Ctrl-C and Ctrl-D."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

IMAGE_Q = "What color is the shape?"


def _chat(*args: str, stdin: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_llava.cli.main", "chat", *args], input=stdin, capture_output=True, text=True,
        timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_piped_chat_answers_runs_commands_and_saves(trained_run, shapes, tmp_path):
    from lora_llava.data.formats import Sample
    from lora_llava.infer import evaluate, load_model

    images = shapes / "images"
    first, second = sorted(images.glob("eval_*.png"))[:2]
    script = f"{IMAGE_Q}\nAnd again?\n/image {second}\n{IMAGE_Q}\n/save {tmp_path / 'c.json'}\n/reset\n/nope\n"
    run = _chat(str(trained_run), "--image", str(first), "--max-new-tokens", "4", stdin=script)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    # the same answers as eval gives for the same prompt
    loaded = load_model(trained_run)
    expected = [
        evaluate(loaded, [Sample("m", 0, "a", [("user", f"<image>\n{IMAGE_Q}"), ("assistant", "x")], [p])], 4).predictions[0]["prediction"]
        for p in (first, second)
    ]  # fmt: skip
    assert lines[0] == expected[0]
    assert lines[2] == f"image: {second} (a new conversation)"
    assert lines[3] == expected[1]
    assert lines[4] == f"saved to {tmp_path / 'c.json'}" and lines[5] == "conversation reset"
    assert "error: unknown command '/nope'" in run.stderr
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved[0]["image"] == f"images/{second.name}"  # copied beside the file: training data as it stands
    assert (tmp_path / "images" / second.name).read_bytes() == second.read_bytes()
    assert saved[0]["conversations"] == [
        {"from": "human", "value": f"<image>\n{IMAGE_Q}"}, {"from": "gpt", "value": expected[1]}
    ]  # fmt: skip
    # the saved record is training data lora_llava reads
    from lora_llava.config.schema import DataSource
    from lora_llava.data.formats import read_source

    good, bad = read_source(DataSource(path=str(tmp_path / "c.json"), image_folder=str(tmp_path)))
    assert not bad and good[0].messages == [("user", f"<image>\n{IMAGE_Q}"), ("assistant", expected[1])]


def test_ctrl_c_while_answering_stops_the_answer_and_the_chat_goes_on(tiny_path, capsys, monkeypatch):
    """SIGINT (Ctrl-C) arriving mid-stream: the answer stops at once, is not kept, and the next question works."""
    import signal

    import lora_llava.cli.chat as chat_cli
    from lora_llava.chat import ChatSession, GenerationSettings
    from lora_llava.infer import load_model

    session = ChatSession(load_model("tiny"), settings=GenerationSettings(max_new_tokens=100000))
    printed = []

    def fake_print(*args, **kwargs):
        printed.append("".join(map(str, args)))
        if len(printed) == 4:  # three pieces of the answer streamed: the user presses Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(chat_cli, "print", fake_print, raising=False)
    t0 = time.time()
    chat_cli._answer(session, "Tell me a story", interactive=True)
    assert printed[-1] == " [stopped]" and time.time() - t0 < 60
    assert session.messages == []  # the stopped answer is not part of the conversation
    session.settings.max_new_tokens = 3
    assert isinstance(session.ask("Hi"), str) and len(session.messages) == 2


@pytest.mark.skipif(os.name != "posix", reason="needs a POSIX pseudo-terminal")
def test_in_a_terminal_ctrl_c_at_the_prompt_and_ctrl_d_exits(tiny_path):
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(
            sys.executable, [sys.executable, "-m", "lora_llava.cli.main", "chat", "tiny", "--max-new-tokens", "3"]
        )
    out = b""

    def read_until(marker: bytes, timeout: float = 120) -> None:
        nonlocal out
        end = time.time() + timeout
        while marker not in out and time.time() < end:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        assert marker in out, out[-500:]
        out = out[out.index(marker) + len(marker) :]

    read_until(b"you> ")
    os.write(fd, b"Hello\r")
    read_until(b"model> ")
    read_until(b"you> ")  # answered, back at the prompt
    # a person presses Ctrl-C some time after the prompt shows: a SIGINT landing between readline printing the
    # prompt and waiting for input is lost by CPython's readline loop (it then waits for a key), so wait a little
    time.sleep(0.5)
    os.write(fd, b"\x03")  # Ctrl-C at the prompt: a fresh line, still running
    read_until(b"you> ")
    os.write(fd, b"\x04")  # Ctrl-D: exits cleanly
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_saves_in_the_same_second_never_share_an_id_or_overwrite_each_other(shapes, tmp_path, monkeypatch):
    """/save three times within one second, each about another image named x.png: three records with ids of
    their own, each pointing at its own image's copy; and chats saving to one file at once all land in it."""
    import threading

    import lora_llava.chat as chat
    from lora_llava.chat import ChatSession

    monkeypatch.setattr(chat.time, "strftime", lambda fmt, *a: "20250101-120000")
    monkeypatch.setattr(chat.time, "time", lambda: 1735732800.0)
    pictures = sorted((shapes / "images").glob("eval_*.png"))[:3]
    sessions = []
    for i, picture in enumerate(pictures):
        (tmp_path / str(i)).mkdir()
        same_name = tmp_path / str(i) / "x.png"
        same_name.write_bytes(picture.read_bytes())
        session = ChatSession(loaded=None, image=same_name)  # no model: saving needs the conversation only
        session.messages = [("user", f"<image>\n{IMAGE_Q}"), ("assistant", f"answer {i}")]
        sessions.append(session)
    out = tmp_path / "saved" / "c.json"
    out.parent.mkdir()
    for session in sessions:
        session.save(out)
    saved = json.loads(out.read_text())
    assert len({r["id"] for r in saved}) == 3 and all(r["id"].startswith("chat-20250101-120000-") for r in saved)
    assert [r["image"] for r in saved] == ["images/x.png", "images/x-2.png", "images/x-3.png"]
    for r, picture in zip(saved, pictures):
        assert (out.parent / r["image"]).read_bytes() == picture.read_bytes(), r
    sessions[0].save(out)  # the same image again: its copy is reused, the record is new
    saved = json.loads(out.read_text())
    assert saved[-1]["image"] == "images/x.png" and len({r["id"] for r in saved}) == 4

    together = tmp_path / "together.json"
    threads = [threading.Thread(target=sessions[i % 3].save, args=(together,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saved = json.loads(together.read_text())
    assert len(saved) == 12 and len({r["id"] for r in saved}) == 12
