"""The ``mllmkit webui`` browser chat (gradio, optional extra ``mllmkit[webui]``).

One model is shared; every browser session gets its own :class:`ChatSession` (held in ``gr.State``),
so sessions never see each other's images or turns. Images can be uploaded at any time, one or
several; chatting without an image is text-only chat. Uploads larger than ``max_upload_mb`` (the
server refuses them too) or that are not images get a message instead of a crash, and a refused
file is deleted from gradio's upload folder; the rest of that cache is cleared after an hour. The server binds to 127.0.0.1 unless told
otherwise and opens a public share link only when asked (``share=True``).

API endpoints (for ``gradio_client``): ``/add_images`` (files), ``/respond`` (message, chat history,
do_sample, num_beams, temperature, top_k, top_p, max_new_tokens, system prompt), ``/restart``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

from mllmkit.chat.session import ChatSession
from mllmkit.errors import UserError

__all__ = ["build_app", "check_upload", "launch", "require_gradio"]


def require_gradio():
    """Import gradio, or say how to install it."""
    try:
        import gradio
    except ImportError:
        raise UserError("the web UI needs gradio, which is not installed: pip install 'mllmkit[webui]'") from None
    return gradio


def check_upload(path: str | pathlib.Path, max_upload_mb: float) -> str | None:
    """Why an uploaded file cannot be used as an image (None if it can): too large, or not a picture
    :func:`mllmkit.data.images.read_image` accepts (this decodes it, so a corrupt file or a header
    declaring a giant picture is refused here, not when the question is asked)."""
    from mllmkit.data.images import read_image

    path = pathlib.Path(path)
    size_mb = path.stat().st_size / 2**20
    if size_mb > max_upload_mb:
        return f"{path.name}: {size_mb:.1f} MB is larger than the {max_upload_mb:g} MB upload limit"
    try:
        read_image(path)
    except UserError:
        return f"{path.name}: not an image (PNG, JPEG, WebP, … expected)"
    return None


def _discard_upload(path: str | pathlib.Path) -> None:
    """Delete a refused file if gradio put it in its upload folder (never a file of the user's own)."""
    from gradio.utils import get_upload_folder

    path, folder = pathlib.Path(path).resolve(), pathlib.Path(get_upload_folder()).resolve()
    if path.is_relative_to(folder):
        path.unlink(missing_ok=True)


def _file_path(item: Any) -> str:
    if isinstance(item, dict):
        return item.get("path") or item.get("name")
    return getattr(item, "path", None) or getattr(item, "name", None) or str(item)


def build_app(base: ChatSession, *, max_upload_mb: float = 10.0, title: str = "mllmkit chat"):
    """The gradio Blocks app; each browser session chats through its own copy of ``base``."""
    gr = require_gradio()
    defaults = base.settings

    def session_of(state: ChatSession | None) -> ChatSession:
        return state if state is not None else ChatSession.like(base)

    def add_images(files, state):
        session = session_of(state)
        lines = []
        for item in files or []:
            path = _file_path(item)
            problem = check_upload(path, max_upload_mb)
            if problem is None:
                try:
                    index = session.add_image(path)
                    lines.append(f"image {index + 1} added: {pathlib.Path(path).name}")
                    continue
                except UserError as exc:
                    problem = str(exc)
            _discard_upload(path)
            lines.append(f"not added: {problem}")
        if not lines:
            lines.append("no file given")
        return "\n\n".join(lines), session.image_sources, None, session

    def respond(message, history, do_sample, num_beams, temperature, top_k, top_p, max_new_tokens, system,
                state) -> Iterator[tuple]:
        session = session_of(state)
        history = list(history or [])
        if not (message or "").strip():
            yield "", history, session
            return
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        try:
            settings = session.settings
            for name, value in (("do_sample", do_sample), ("num_beams", num_beams), ("temperature", temperature),
                                ("top_k", top_k), ("top_p", top_p), ("max_new_tokens", max_new_tokens)):
                settings = settings.with_value(name, value)
            session.settings = settings
            session.system = system.strip() if system and system.strip() else base.system
            text = ""
            for piece in session.stream(message):
                text += piece
                history[-1] = {"role": "assistant", "content": text}
                yield "", history, session
            if not text:
                history[-1] = {"role": "assistant", "content": "(empty answer)"}
        except UserError as exc:
            history[-1] = {"role": "assistant", "content": f"error: {exc}"}
        yield "", history, session

    def restart(state):
        session = session_of(state)
        session.clear()
        return [], "", [], "conversation and images cleared", session

    # uploads are copied into gradio's cache; files older than an hour are removed every hour
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        state = gr.State(None)
        gr.Markdown(f"## {title}\nUpload images (optional), then ask. Each browser tab is its own conversation.")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", type="filepath", elem_id="images")
                upload = gr.Button("Add images", elem_id="add-images")
                status = gr.Markdown(elem_id="upload-status")
                gallery = gr.Gallery(label="Images in this conversation", columns=3, height=200)
                with gr.Accordion("Generation", open=False):
                    do_sample = gr.Checkbox(value=defaults.do_sample, label="do_sample (sample; otherwise greedy "
                                            "or beam search, and temperature/top-k/top-p have no effect)")
                    num_beams = gr.Slider(1, 10, value=defaults.num_beams, step=1, label="num_beams")
                    temperature = gr.Slider(0.1, 2.0, value=defaults.temperature, step=0.1, label="temperature")
                    top_k = gr.Slider(0, 100, value=defaults.top_k, step=1, label="top_k (0 = off)")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="top_p")
                    max_new_tokens = gr.Slider(1, 2048, value=defaults.max_new_tokens, step=1,
                                               label="max_new_tokens")
                    system = gr.Textbox(value=base.system or "", label="System prompt (empty = default)", lines=2)
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=480)
                message = gr.Textbox(label="Message", placeholder="Ask something and press Enter",
                                     elem_id="message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Restart 🔄", elem_id="restart")

        upload.click(add_images, [files, state], [status, gallery, files, state], api_name="add_images")
        inputs = [message, chatbot, do_sample, num_beams, temperature, top_k, top_p, max_new_tokens, system, state]
        message.submit(respond, inputs, [message, chatbot, state], api_name="respond")
        send.click(respond, inputs, [message, chatbot, state], api_name=False)
        clear.click(restart, [state], [chatbot, message, gallery, status, state], api_name="restart")
    return app


def launch(base: ChatSession, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           max_upload_mb: float = 10.0, block: bool = True):
    """Build and serve the app (on ``host``:``port``; a public link only with ``share``). Returns the app."""
    app = build_app(base, max_upload_mb=max_upload_mb)
    app.queue()
    app.launch(server_name=host, server_port=port, share=share, inbrowser=False, prevent_thread_lock=not block,
               max_file_size=int(max_upload_mb * 2**20),  # larger uploads are refused by the server itself
               quiet=not block)
    return app
