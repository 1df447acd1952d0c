"""An OpenAI-compatible HTTP API over one `TextModel` (FastAPI; uvicorn runs it in `stage=serve`).

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the one model served
    POST /v1/completions         text in, text out (a list of prompts is generated as one batch)
    POST /v1/chat/completions    messages in, an assistant message out, rendered with the chat template

Both POSTs stream server-sent events with `"stream": true`, ending in `data: [DONE]`. Errors are JSON
in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status: a malformed
body or field (400), an unknown model (404), a prompt that with `max_tokens` exceeds the context
(400: refused, never truncated). Requests are served one at a time, in arrival order, by a lock
around the model: concurrent clients queue, and no request sees another's state. A request without
a `seed` (or with seed -1) samples with a fresh one; the other sampling fields default to `generate.*`.
No request gets a 500: a field out of its range (Infinity, a seed beyond int64, a lone surrogate in
text) and a setting lab's own checks refuse are 400s, streaming or not.
"""
from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Iterator, Literal, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from lab.config_stages import Sampling
from lab.data.chat import Message
from lab.errors import LabError
from lab.inference import TextModel


def _utf8(text: str) -> str:
    """JSON can carry a lone surrogate ("\\ud800"), which is no character and no UTF-8 a tokenizer reads."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds {text[e.start]!r} at character {e.start}, a lone surrogate that is not text; "
                         "send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class _Request(BaseModel):
    # clients send fields lab does not use (user, logit_bias, ...); Infinity and NaN are no number a sampler takes
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)  # not OpenAI's, but vLLM's and llama.cpp's
    repetition_penalty: Optional[float] = Field(None, gt=0)
    n: int = Field(1, ge=1, le=1)  # one completion per prompt
    stream: bool = False
    stop: Union[Text, list[Text], None] = None
    seed: Optional[int] = Field(None, ge=-1, le=2**63 - 1)  # OpenAI's is an int64; -1 means "random", as in llama.cpp


class CompletionRequest(_Request):
    prompt: Union[Text, list[Text]]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


@dataclass
class Stats:
    """What the server did, logged to its MLflow run when it stops."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Stopped(Exception):
    """The client went away mid-stream: generation stops."""


class Server:
    """One model behind the API: its sampling defaults, the lock that serves one request at a time,
    and the counts the run logs."""

    def __init__(self, tm: TextModel, defaults: Sampling, stats: Stats):
        self.tm, self.defaults, self.stats = tm, defaults, stats
        self.lock = threading.Lock()

    def answer(self, req: _Request, ids: list[list[int]], max_tokens: Optional[int], kind: str, choice, chunk):
        """The response to `req` for prompts `ids`: whole, or streamed as server-sent events."""
        tm = self.tm
        if req.model != tm.name:
            raise APIError(404, f"the model {req.model!r} does not exist here; this server serves {tm.name!r}",
                           "model", "model_not_found")
        sampling = self.sampling(req, ids, max_tokens)
        prompt = sum(len(i) for i in ids)
        self.stats.requests += 1
        self.stats.prompt_tokens += prompt
        head = {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": tm.name}
        if req.stream:
            return StreamingResponse(self.events(ids, sampling, head, kind, chunk), media_type="text/event-stream")
        with self.lock:
            result = tm.complete(ids, sampling)
        used = sum(len(c.ids) for c in result.completions)
        self.stats.completion_tokens += used
        return head | {"object": kind, "choices": [choice(i, c) for i, c in enumerate(result.completions)],
                       "usage": {"prompt_tokens": prompt, "completion_tokens": used, "total_tokens": prompt + used}}

    def sampling(self, req: _Request, ids: list[list[int]], max_tokens: Optional[int]) -> Sampling:
        """The request's sampling settings over `generate.*`; refused where the context cannot hold them."""
        tm, defaults = self.tm, self.defaults
        longest = max(len(i) for i in ids)
        if max_tokens is not None and longest + max_tokens > tm.context:
            raise APIError(400, f"this model's context is {tm.context} tokens, but {longest + max_tokens} were requested "
                                f"({longest} in the prompt, {max_tokens} for the completion); shorten the prompt or "
                                "lower max_tokens", "max_tokens", "context_length_exceeded")
        if longest >= tm.context:
            raise APIError(400, f"this model's context is {tm.context} tokens, and the prompt alone is {longest}; "
                                "shorten it", "prompt", "context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or defaults.stop)
        chosen = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                  if getattr(req, k) is not None}
        seed = None if req.seed == -1 else req.seed  # None: a fresh seed
        return tm.resolved(dataclasses.replace(defaults, **chosen, stop=stop, seed=seed,
                                               max_new_tokens=max_tokens or min(defaults.max_new_tokens, tm.context - longest)))

    def events(self, ids: list[list[int]], sampling: Sampling, head: dict, kind: str, chunk) -> Iterator[str]:
        """Server-sent events: generation runs in a thread and hands text over through a queue."""
        pieces: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        gone = threading.Event()

        def on_text(row: int, text: str) -> None:
            if gone.is_set():
                raise _Stopped
            pieces.put(("text", (row, text)))

        def work() -> None:
            try:
                with self.lock:
                    pieces.put(("done", self.tm.complete(ids, sampling, on_text=on_text)))
            except _Stopped:
                pass
            except Exception as e:  # reported to the client as the stream's last event
                pieces.put(("error", e))

        threading.Thread(target=work, daemon=True).start()
        obj = f"{kind}.chunk" if kind.startswith("chat") else kind
        send = lambda body: f"data: {json.dumps(head | {'object': obj} | body)}\n\n"  # noqa: E731
        try:
            if kind.startswith("chat"):
                yield send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            while True:
                what, value = pieces.get()
                if what == "text":
                    yield send({"choices": [chunk(value[0], value[1], None)]})
                elif what == "done":
                    self.stats.completion_tokens += sum(len(c.ids) for c in value.completions)
                    yield send({"choices": [chunk(i, "", c.finish_reason) for i, c in enumerate(value.completions)]})
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield f"data: {json.dumps({'error': {'message': str(value), 'type': 'server_error'}})}\n\n"
                    return
        finally:
            gone.set()  # a client that disconnected stops the generation at its next token


def _server(request: Request) -> Server:
    return request.app.state.server


routes = APIRouter()


@routes.get("/health")
def health() -> dict:
    return {"status": "ok"}


@routes.get("/v1/models")
def models(server: Server = Depends(_server)) -> dict:
    return {"object": "list", "data": [{"id": server.tm.name, "object": "model", "created": int(time.time()),
                                        "owned_by": "lab"}]}


@routes.post("/v1/completions")
def completions(req: CompletionRequest, server: Server = Depends(_server)):
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts or not all(prompts):
        raise APIError(400, "prompt: give a non-empty string (or a list of them)", "prompt")
    tokenizer = server.tm.tokenizer
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]  # plain text, template or not
    return server.answer(req, ids, req.max_tokens, "text_completion", _text_choice, _text_chunk)


@routes.post("/v1/chat/completions")
def chat(req: ChatRequest, server: Server = Depends(_server)):
    if server.tm.template is None:
        raise APIError(400, "this model has no chat template (it was not fine-tuned on chats); use /v1/completions, "
                            "or serve it with generate.template=<chatml | chat | ...>", "messages")
    try:
        ids = [server.tm.encode([Message(m.role, m.content) for m in req.messages])]
    except (LabError, ValueError) as e:
        raise APIError(400, f"messages: {e}", "messages") from None
    return server.answer(req, ids, req.max_completion_tokens or req.max_tokens, "chat.completion", _chat_choice, _chat_chunk)


async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()  # a union field reports each branch: the value's own fault says the most
    first = next((x for x in errors if x["type"] == "value_error"), errors[0])
    if first["type"] == "json_invalid":
        return _error(400, f"the body is not valid JSON (at character {first['loc'][-1]}); send a JSON object",
                      code="invalid_json")
    where = ".".join(str(p) for p in first["loc"] if p != "body" and "[" not in str(p))  # not a branch's tag
    return _error(400, f"{where or 'body'}: {first['msg']}", param=where or None, code="invalid_value")


async def _http(_request: Request, e: HTTPException) -> JSONResponse:
    return _error(e.status_code, str(e.detail))


async def _api(_request: Request, e: APIError) -> JSONResponse:
    return _error(e.status, e.message, e.param, e.code)


async def _lab(_request: Request, e: LabError) -> JSONResponse:  # a request lab's own checks refuse
    return _error(400, str(e), code="invalid_value")


def build_app(tm: TextModel, defaults: Sampling, stats: Stats) -> FastAPI:
    """The API over `tm`; `defaults` fill the sampling fields a request leaves out."""
    app = FastAPI(title=f"lab: {tm.name}")
    app.state.server = Server(tm, defaults, stats)
    app.include_router(routes)
    for error, handler in ((RequestValidationError, _invalid), (HTTPException, _http), (APIError, _api), (LabError, _lab)):
        app.add_exception_handler(error, handler)
    return app


def _text_choice(i: int, c) -> dict:
    return {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}


def _chat_choice(i: int, c) -> dict:
    return {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}


def _text_chunk(i: int, text: str, finish: Optional[str]) -> dict:
    return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}


def _chat_chunk(i: int, text: str, finish: Optional[str]) -> dict:
    return {"index": i, "delta": {"content": text} if text else {}, "finish_reason": finish}
