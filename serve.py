"""Chat with a fine-tuned Phi-3.5-vision in the browser, optionally beside the base model.

    python serve.py --model output                                   # then open http://127.0.0.1:7860
    python serve.py --model output --compare microsoft/Phi-3.5-vision-instruct
    python serve.py --model output/checkpoint-500 --host 0.0.0.0 --port 8000

--model is anything predict.py takes: a run's --output_dir (full fine-tuning, or a LoRA adapter, whose base model
comes from its adapter_config.json or --base_model), the merged model of a LoRA run, a checkpoint-N folder, or
the base model itself (hub id or folder). With --compare, a second model answers every question beside the first,
so the effect of fine-tuning shows at a glance.

On the page: drop one or several images, or a video (--num_frames evenly spaced frames become its images), type a
question, and the answer streams in token by token. The conversation keeps its turns and the images given so far;
"New chat" starts over. num_crops, max_new_tokens and sampling are set on the page (greedy by default, which
answers exactly as predict.py does). Every browser tab has its own conversation; a model answers one tab at a time.

Loading, prompt building and generation are phi3v.inference, the same code predict.py runs. The page is NiceGUI
(FastAPI + Vue/Quasar, pushed updates over a websocket); it binds to 127.0.0.1 unless --host says otherwise.
"""

import argparse
import asyncio
import os
import re
import tempfile
import threading
import traceback
from dataclasses import dataclass

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", "--model_name_or_path", dest="model", default="microsoft/Phi-3.5-vision-instruct",
                        help="fine-tuned output folder (full model or LoRA adapter), merged model, checkpoint-N "
                             "folder, or base model")
    parser.add_argument("--base_model", help="base model of a LoRA adapter --model (default: the adapter's record)")
    parser.add_argument("--compare", help="a second model (typically the base model) answering beside --model")
    parser.add_argument("--compare_base_model", help="base model of a LoRA adapter --compare")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--num_crops", type=int, help="initial max 336px crops per image (default: the processor's)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="initial value on the page")
    parser.add_argument("--num_frames", type=int, default=8, help="initial number of frames taken from a video")
    parser.add_argument("--system", default="", help="initial system message (empty: none)")
    parser.add_argument("--max_upload_mb", type=float, default=200, help="largest file the page accepts")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--use_flash_attention", action="store_true", help="flash-attn 2 if installed, else SDPA")
    args = parser.parse_args(argv)
    for name in ("num_crops", "max_new_tokens", "num_frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    return args


# ------------------------------------------------------------------------------------------------ models
@dataclass
class Slot:
    """One model on the page: its column title, the model, its processor, and a lock (one generation at a time)."""

    title: str
    model: object
    processor: object
    lock: threading.Lock


def load_slots(args) -> list[Slot]:
    """The models to serve; a folder that does not load ends the program with one line naming it."""
    from phi3v.errors import exit_with_error, one_line  # `serve.py: error: ...`, exit status 2, as every entry point
    from phi3v.inference import describe_model_folder, load_for_inference, pick_device_and_dtype

    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    wanted = [("--model", args.model, args.base_model)]
    if args.compare:
        wanted.append(("--compare", args.compare, args.compare_base_model))
    for flag, path, base in wanted:  # the cheap checks of every folder before loading any weights
        try:
            describe_model_folder(path, base)
        except (OSError, ValueError) as error:
            exit_with_error(f"{flag} {path}: {one_line(error)}")
    slots = []
    for flag, path, base in wanted:
        try:
            model, processor = load_for_inference(path, base, dtype, device, args.use_flash_attention)
        except Exception as error:
            exit_with_error(f"{flag} {path} does not load: {one_line(error)}")
        slots.append(Slot(f"{flag} {path}", model, processor, threading.Lock()))
    return slots


# ------------------------------------------------------------------------------------------------ uploads
def decode_upload(name, data, num_frames) -> list:
    """The RGB images of one uploaded file: an image, or up to `num_frames` frames of a video.
    ValueError (naming the file) for anything else: not an image, corrupt, a video that does not decode."""
    from phi3v.media import open_image
    from phi3v.video import read_video_frames

    safe = re.sub(r"[^\w.-]", "_", os.path.basename(name))[-100:] or "upload"
    with tempfile.TemporaryDirectory(prefix="phi3v-serve-") as folder:
        path = os.path.join(folder, safe)
        with open(path, "wb") as f:
            f.write(data)
        try:
            if safe.lower().endswith(VIDEO_SUFFIXES):
                frames = read_video_frames(path, num_frames, max_frames=True)
                if not frames:
                    raise ValueError(f"{path}: no frames decoded from the video")
                return [open_image(frame, path) for frame in frames]
            return [open_image(path, "upload")]
        except ValueError as error:  # BadSampleError and VideoError are ValueErrors
            raise ValueError(str(error).replace(path, name)) from None


# ------------------------------------------------------------------------------------------------ the page
class Chat:
    """One browser tab's conversation: its own turns, images and answers, never shared with another tab."""

    def __init__(self, slots, args):
        from nicegui import ui

        self.ui, self.slots, self.args = ui, slots, args
        self.turns = []  # (question, number of images given with it)
        self.answers = [[] for _ in slots]  # per model, one answer per turn
        self.images = []  # every image of the conversation so far, in tag order
        self.pending = []  # (file name, images) uploaded for the next question
        self.busy = False
        self.stop = threading.Event()
        ui.context.client.on_delete(lambda: self.stop.set())  # a closed tab stops its generation
        self.build()

    # ------------------------------------------------------------------ layout
    def build(self):
        ui = self.ui
        ui.page_title("Phi-3-V chat")
        ui.add_css(".phi3v-text { white-space: pre-wrap; word-break: break-word; }"
                   ".upload .q-uploader__subtitle { display: none; }")  # "0.0B / 0.00%": uploads are attached at once
        with ui.header().classes("items-center"):
            ui.label("Phi-3-V chat").classes("text-lg font-bold")
            ui.label("  |  ".join(slot.title for slot in self.slots)).classes("text-sm opacity-80")
        with ui.row().classes("w-full no-wrap items-start"):
            with ui.column().classes("w-72 shrink-0"):
                self.upload = ui.upload(
                    label="Images or a video", multiple=True, auto_upload=True,
                    max_file_size=int(self.args.max_upload_mb * 2**20), on_multi_upload=self.on_upload,
                    on_begin_upload=self.clear_error,
                    on_rejected=lambda: self.show_error(f"file too large (over {self.args.max_upload_mb} MB)"),
                ).props("accept=image/*,video/*").classes("w-full upload")
                self.attached = ui.row().classes("w-full gap-1 attached")
                ui.button("Remove attachments", on_click=self.clear_pending).props("flat dense size=sm")
                self.num_crops = ui.number("num_crops", value=self.args.num_crops or self.slots[0].processor.num_crops,
                                           min=1, max=16, step=1, precision=0).classes("w-full num-crops")
                self.max_new_tokens = ui.number("max_new_tokens", value=self.args.max_new_tokens, min=1, step=1,
                                                precision=0).classes("w-full max-new-tokens")
                self.num_frames = ui.number("video frames", value=self.args.num_frames, min=1, max=64, step=1,
                                            precision=0).classes("w-full num-frames")
                self.do_sample = ui.switch("sample (off: greedy)", value=False).classes("do-sample")
                with ui.row().classes("w-full no-wrap"):
                    self.temperature = ui.number("temperature", value=1.0, min=0.01, step=0.1).classes(
                        "w-1/3 temperature")
                    self.top_p = ui.number("top_p", value=1.0, min=0.01, max=1.0, step=0.05).classes("w-1/3 top-p")
                    self.top_k = ui.number("top_k", value=50, min=0, step=1, precision=0).classes("w-1/3 top-k")
                for element in (self.temperature, self.top_p, self.top_k):
                    element.bind_enabled_from(self.do_sample, "value")
                self.system = ui.textarea("system message", value=self.args.system).classes("w-full system")
            with ui.column().classes("grow min-w-0"):
                with ui.row().classes("w-full no-wrap items-start"):
                    self.columns = []
                    for index, slot in enumerate(self.slots):
                        with ui.card().classes("grow basis-0 min-w-0"):
                            ui.label(slot.title).classes("font-bold text-sm break-all")
                            self.columns.append(ui.column().classes(f"w-full gap-2 conversation model-{index}"))
                self.error = ui.label("").classes("text-negative phi3v-text phi3v-error")
                with ui.row().classes("w-full no-wrap items-end"):
                    self.question = ui.textarea(placeholder="Ask about the images (Enter sends, Shift+Enter: new "
                                                            "line)").classes("grow question").props("autogrow outlined")
                    self.question.on("keydown.enter.exact.prevent", self.send)
                    self.send_button = ui.button("Send", on_click=self.send).classes("send")
                    ui.button("Stop", on_click=lambda: self.stop.set()).props("outline").classes("stop")
                    ui.button("New chat", on_click=self.new_chat).props("outline").classes("new-chat")
                self.status = ui.label("ready").classes("text-xs opacity-60 status")

    def show_error(self, message):
        self.error.text = message  # in red above the question box (a toast would pile up over the buttons)

    def clear_error(self):
        self.error.text = ""

    def show_attached(self):
        self.attached.clear()
        with self.attached:
            for name, images in self.pending:
                what = f"{name} ({len(images)} frames)" if len(images) > 1 else name
                self.ui.chip(what, icon="image").props("dense").classes("attachment")

    def clear_pending(self):
        self.pending = []
        self.show_attached()

    def new_chat(self):
        if self.busy:
            return self.show_error("wait for the answer (or press Stop) before starting a new chat")
        self.turns, self.images, self.answers = [], [], [[] for _ in self.slots]
        for column in self.columns:
            column.clear()
        self.clear_pending()
        self.error.text = ""

    # ------------------------------------------------------------------ uploads
    async def on_upload(self, event):
        from nicegui import run

        errors = []
        for file in event.files:
            try:
                images = await run.io_bound(decode_upload, file.name, await file.read(), self.setting_int(
                    self.num_frames, "video frames"))
            except ValueError as error:
                errors.append(str(error))
                continue
            self.pending.append((file.name, images))
        self.upload.reset()
        self.show_attached()
        if errors:
            self.show_error("\n".join(errors))
        else:
            self.error.text = ""

    # ------------------------------------------------------------------ questions
    @staticmethod
    def setting_int(element, name):
        if element.value is None or element.value != int(element.value):
            raise ValueError(f"{name} must be a whole number")
        return int(element.value)

    def settings(self):
        from phi3v.inference import GenerationSettings

        def number(element, name):
            if element.value is None:
                raise ValueError(f"{name} is empty")
            return float(element.value)

        settings = GenerationSettings(
            max_new_tokens=self.setting_int(self.max_new_tokens, "max_new_tokens"),
            num_crops=self.setting_int(self.num_crops, "num_crops"),
            do_sample=bool(self.do_sample.value),
            temperature=number(self.temperature, "temperature"),
            top_p=number(self.top_p, "top_p"),
            top_k=self.setting_int(self.top_k, "top_k"),
        )
        settings.check()
        return settings

    async def send(self):
        """Send's (and Enter's) handler: one question at a time in a tab, and the tab is free again after it on
        every path, a bug's included (a tab left busy would refuse every later question)."""
        from phi3v.errors import one_line

        if self.busy:
            return
        self.busy = True
        try:
            await self.ask()
        except Exception as error:  # a bug, not a bad input (ask shows those): one line here, the traceback in the log
            traceback.print_exc()
            self.stop.set()  # a generation it started does not run on for an answer no one shows
            self.show_error(f"failed: {one_line(error)} (the server's log has the traceback)")
        finally:
            self.busy = False
            self.status.text = "ready"

    async def ask(self):
        """The question in the box, to every model: its turn and the streamed answers shown in each column."""
        from nicegui import run

        from phi3v.inference import conversation, prepare_inputs

        self.clear_error()
        question = (self.question.value or "").strip()
        if not question:
            return self.show_error("type a question first")
        new_images = [image for _, group in self.pending for image in group]
        images = self.images + new_images
        system = (self.system.value or "").strip() or None
        self.status.text = "reading the input"
        try:
            settings = self.settings()
            inputs = []
            for index, slot in enumerate(self.slots):
                turns = [(q, n, a) for (q, n), a in zip(self.turns, self.answers[index])]
                messages = conversation(turns + [(question, len(new_images), None)], system)
                inputs.append(await run.io_bound(prepare_inputs, slot.model, slot.processor, messages, images,
                                                 settings))
        except ValueError as error:  # tags that do not match the images, a prompt over the limit, a bad setting
            return self.show_error(str(error))
        self.error.text = ""
        self.stop = threading.Event()
        labels = self.show_question(question, new_images)
        self.question.value = ""
        self.status.text = "generating"
        results = await asyncio.gather(*(self.stream(slot, data, label, settings)
                                         for slot, data, label in zip(self.slots, inputs, labels)))
        failed = [error for _, error in results if error is not None]
        if failed:
            self.show_error("generation failed: " + "; ".join(failed))
        else:  # the turn joins the conversation only when every model answered
            self.turns.append((question, len(new_images)))
            self.images = images
            for answers, (text, _) in zip(self.answers, results):
                answers.append(text)
            self.pending = []
            self.show_attached()

    def show_question(self, question, new_images):
        """The question (and thumbnails of its new images) in every column; the empty labels its answers go in."""
        labels = []
        for column in self.columns:
            with column:
                with self.ui.element("div").classes("self-end bg-blue-1 rounded p-2 max-w-full user-turn"):
                    if new_images:
                        with self.ui.row().classes("gap-1"):
                            for image in new_images[:12]:
                                thumbnail = image.copy()
                                thumbnail.thumbnail((96, 96))
                                self.ui.image(thumbnail).classes("w-16 h-16").props("fit=contain")
                    self.ui.label(question).classes("phi3v-text")
                labels.append(self.ui.label("").classes("bg-grey-2 rounded p-2 max-w-full phi3v-text phi3v-answer"))
        return labels

    async def stream(self, slot, inputs, label, settings):
        """Generate in a worker thread, showing the text as it comes; (answer, None) or (None, error message)."""
        from phi3v.errors import one_line
        from phi3v.inference import generate, text_streamer

        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        stop = self.stop

        def put(kind, value=None):
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work():
            try:
                with slot.lock:  # another tab's question on this model finishes first
                    put("start")
                    streamer = text_streamer(slot.processor, lambda text: put("text", text))
                    put("done", generate(slot.model, slot.processor, inputs, settings, streamer, stop))
            except Exception as error:
                traceback.print_exc()
                put("error", one_line(error))

        if slot.lock.locked():
            label.text = "(waiting for the model: another tab is using it)"
        threading.Thread(target=work, daemon=True).start()
        shown = ""
        while True:
            kind, value = await queue.get()
            if kind == "start":
                label.text = ""
            elif kind == "text":
                shown += value
                label.text = shown
            elif kind == "done":
                label.text = value  # the decoded answer, as predict.py returns it
                label.classes(add="phi3v-done")
                return value, None
            else:
                label.text = f"(failed: {value})"
                label.classes(add="phi3v-done phi3v-failed")
                return None, value


def main(argv=None):
    args = parse_args(argv)
    slots = load_slots(args)

    os.environ.setdefault("NICEGUI_STORAGE_PATH", os.path.join(tempfile.gettempdir(), "phi3v-serve-nicegui"))
    from nicegui import ui

    @ui.page("/")
    def page():
        Chat(slots, args)

    print(f"serve.py: {' and '.join(slot.title for slot in slots)} on http://{args.host}:{args.port}", flush=True)
    ui.run(host=args.host, port=args.port, reload=False, show=False, title="Phi-3-V chat",
           show_welcome_message=False, uvicorn_logging_level="warning")


if __name__ == "__main__":
    main()
