"""A browser demo of a trained model: upload an image, chat, answers streamed, the model's lineage beside.

Usage::

    with private_uploads():                 # Gradio's uploads in a folder of their own, removed at exit
        app = build_app(load_model("runs/quickstart"), lineage("runs/quickstart"))
        app.queue().launch(**launch_options("127.0.0.1", 7860))

Needs Gradio (``pip install 'lora_llava[demo]'``), not a core dependency. Each browser session keeps its
own conversation; a new image starts a new one. The lineage panel reads the run directory: base,
chat format, training numbers, eval before and after, the data report and the merge verification.

Reachable from the network (``--host``), the demo bounds what a visitor can make it hold and show:
an upload over ``MAX_UPLOAD_BYTES`` is refused by Gradio before it is stored; a new image is checked
with the data layer's loader (``load_image``: its byte, pixel, aspect and format limits) before the
model sees it, and a refused upload is deleted at once; Gradio deletes uploads ``DELETE_UPLOADS[1]``
seconds old (every ``DELETE_UPLOADS[0]`` seconds, and all of them when the server stops), and
``private_uploads`` keeps them in a folder of their own, removed at exit; an error is shown with every
local path replaced by ``<local>/<its last part>`` (``shown_error``), and an error the handler did not
raise is shown only as "Error" (``show_error=False``).
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lora_llava.artifacts import open_artifact
from lora_llava.card import scrub
from lora_llava.chat import ChatSession, GenerationSettings
from lora_llava.data.images import MAX_FILE_BYTES, ImageError, load_image
from lora_llava.errors import UserError
from lora_llava.infer import Loaded

MAX_UPLOAD_BYTES = MAX_FILE_BYTES  # Gradio refuses a larger upload before storing it (the loader's own cap)
DELETE_UPLOADS = (600, 3600)  # Gradio's delete_cache: every 10 minutes, uploads over an hour old are deleted
GONE = "the image is no longer on the server (uploads are deleted after an hour); upload it again"


def lineage(ref: str) -> str:
    """Markdown: what the model is and how it was made, from what its run directory recorded; local paths
    scrubbed, as on a pushed model's card (the page may be served to others with --host)."""
    art = open_artifact(ref)
    lin = art.lineage()
    lines = [f"**{art.description}** `{scrub(ref)}`"]
    if art.meta is not None:
        backbone = lin.backbone if lin.backbone is not None else "?"
        chat_format = lin.chat_format if lin.chat_format is not None else "?"
        lines.append(f"- base: `{backbone}`; chat format `{chat_format}`")
    if lin.steps is not None:
        loss = f"{lin.train_loss:.4f}" if lin.train_loss is not None else "n/a"
        lines.append(f"- trained {lin.steps} steps on {lin.train_samples} samples, mean loss {loss}"
                     + (f", {lin.hardware}" if lin.hardware else ""))  # fmt: skip
    if lin.accuracy is not None:
        lines.append("- eval accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in lin.accuracy.items()))
    merge = lin.merge
    if merge is not None and merge.folder == lin.folder and merge.samples:  # this model's own merge
        lines.append(f"- merge verified: {merge.answers_equal}/{merge.answers_total} answers equal to the adapter's")
    if lin.data_report is not None:
        lines.append("\n**data**\n\n```\n" + scrub(lin.data_report) + "\n```")
    return "\n".join(lines)


def shown_error(e: BaseException) -> str:
    """``e`` as the browser shows it: the message (a lora_llava error's own, else ``Type: message``) with every
    local path replaced by ``<local>/<its last part>``, HTML-escaped (Gradio renders an error as HTML)."""
    text = str(e) if isinstance(e, (UserError, ImageError)) else f"{type(e).__name__}: {e}"
    return html.escape(scrub(text), quote=False)


def _checked_upload(image: str, uploads: Path | None) -> Path:
    """A newly uploaded image, checked by the data layer's loader (bytes, pixels, aspect, format); a refused
    upload is deleted at once when it lies in ``uploads`` (Gradio's upload folder)."""
    path = Path(image)
    if not path.is_file():
        raise UserError(GONE)
    try:
        load_image(path)
    except ImageError as e:
        if uploads is not None and path.resolve().is_relative_to(uploads.resolve()):
            path.unlink(missing_ok=True)
        raise UserError(f"this image cannot be used: {e}") from None
    return path


def respond_fn(loaded: Loaded, uploads: Path | None = None) -> Callable[..., Iterator[tuple[list, str, dict]]]:
    """The demo's chat handler: (question, image path, history, state, temperature, top_p, max_new_tokens) ->
    (history, question box, state) as the answer streams. A new image starts a new conversation once the
    loader accepts it; any error is raised as ``gradio.Error`` with its message scrubbed (``shown_error``)."""
    import gradio as gr

    def respond(
        question: str, image: str | None, history: list, state: dict, temperature: float, top_p: float,
        max_new_tokens: float,
    ) -> Iterator[tuple[list, str, dict]]:  # fmt: skip
        question = (question or "").strip()
        if not question:
            yield history, "", state
            return
        try:
            if image != state.get("image"):  # another image: another conversation
                if image:
                    _checked_upload(image, uploads)
                state = {"image": image, "messages": []}
                history = []
            elif image and not Path(image).is_file():  # deleted by age (DELETE_UPLOADS)
                raise UserError(GONE)
            session = ChatSession(
                loaded, settings=GenerationSettings(int(max_new_tokens), float(temperature), float(top_p))
            )
            session.image = Path(image) if image else None
            session.messages = list(state.get("messages", []))
            history = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
            for piece in session.stream(question):
                history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
                yield history, "", state
        except Exception as e:
            raise gr.Error(shown_error(e)) from e  # the cause in the server's log, the scrubbed message in the browser
        yield history, "", {"image": image, "messages": session.messages}

    return respond


def build_app(loaded: Loaded, lineage_md: str = "", title: str = "lora-llava demo") -> Any:
    """The Gradio app (not launched): uploads go to Gradio's upload folder as it is now (``GRADIO_TEMP_DIR``,
    see ``private_uploads``) and are deleted by age (``DELETE_UPLOADS``)."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    respond = respond_fn(loaded, Path(get_upload_folder()))
    with gr.Blocks(title=title, delete_cache=DELETE_UPLOADS) as app:
        gr.Markdown(f"# {title}")
        with gr.Row():
            with gr.Column(scale=1):
                # image_mode=None: the upload's path as it is (no decoding, no converted copy before load_image)
                image = gr.Image(type="filepath", image_mode=None, label="Image", elem_id="image")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                max_new = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
                with gr.Accordion("Model lineage", open=True):
                    gr.Markdown(lineage_md or "(no run directory recorded)", elem_id="lineage")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=420)
                question = gr.Textbox(
                    placeholder="Ask about the image, then Enter", label="Question", elem_id="question"
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("New conversation", elem_id="clear")
        state = gr.State({"image": None, "messages": []})
        inputs = [question, image, chatbot, state, temperature, top_p, max_new]
        send.click(respond, inputs, [chatbot, question, state])
        question.submit(respond, inputs, [chatbot, question, state])
        clear.click(lambda: ([], "", {"image": None, "messages": []}), None, [chatbot, question, state])
    return app


@contextmanager
def private_uploads() -> Iterator[Path]:
    """A new folder (mode 0700) for Gradio's uploads and copies while the demo runs (``GRADIO_TEMP_DIR``, read
    when the app is built and launched): removed with all it holds when the block ends, however it ends."""
    folder = Path(tempfile.mkdtemp(prefix="lora-llava-demo-"))
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before
        shutil.rmtree(folder, ignore_errors=True)


def launch_options(host: str, port: int) -> dict[str, Any]:
    """The arguments of ``app.launch``: no share link, uploads over ``MAX_UPLOAD_BYTES`` refused, and an unexpected
    error shown as "Error" alone (its text may name server paths; the handler's own errors are shown, scrubbed).
    No ``allowed_paths``: Gradio serves no local folder beyond its own upload folder."""
    return {
        "server_name": host,
        "server_port": port,
        "share": False,
        "show_error": False,
        "quiet": True,
        "max_file_size": MAX_UPLOAD_BYTES,
    }
