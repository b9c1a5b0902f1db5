"""A browser demo of a trained model: upload an image, chat, answers streamed, the model's lineage beside.

Usage::

    app = build_app(load_model("runs/quickstart"), lineage("runs/quickstart"))
    app.launch(server_name="127.0.0.1", server_port=7860)

Needs Gradio (``pip install 'lora_llava[demo]'``), not a core dependency. Each browser session keeps its
own conversation; a new image starts a new one. The lineage panel reads the run directory: base,
chat format, training numbers, eval before and after, the data report and the merge verification.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_llava.artifacts import open_artifact
from lora_llava.chat import ChatSession, GenerationSettings
from lora_llava.infer import Loaded


def lineage(ref: str) -> str:
    """Markdown: what the model is and how it was made, from what its run directory recorded."""
    art = open_artifact(ref)
    lin = art.lineage()
    lines = [f"**{art.description}** `{ref}`"]
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
        lines.append("\n**data**\n\n```\n" + lin.data_report + "\n```")
    return "\n".join(lines)


def build_app(loaded: Loaded, lineage_md: str = "", title: str = "lora-llava demo") -> Any:
    """The Gradio app (not launched)."""
    import gradio as gr

    def respond(
        question: str, image: str | None, history: list, state: dict, temperature: float, top_p: float,
        max_new_tokens: float,
    ) -> Iterator[tuple[list, str, dict]]:  # fmt: skip
        question = (question or "").strip()
        if not question:
            yield history, "", state
            return
        if image != state.get("image"):  # another image: another conversation
            state = {"image": image, "messages": []}
            history = []
        session = ChatSession(
            loaded, settings=GenerationSettings(int(max_new_tokens), float(temperature), float(top_p))
        )
        session.image = Path(image) if image else None
        session.messages = list(state.get("messages", []))
        history = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        for piece in session.stream(question):
            history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
            yield history, "", state
        yield history, "", {"image": image, "messages": session.messages}

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", elem_id="image")
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
