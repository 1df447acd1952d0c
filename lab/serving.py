"""An OpenAI-compatible HTTP API over one `TextModel` (FastAPI; uvicorn runs it in `stage=serve`).

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the one model served
    POST /v1/completions         text in, text out (a list of prompts is generated as one batch)
    POST /v1/chat/completions    messages in, an assistant message out, rendered with the chat template

Both POSTs stream server-sent events with `"stream": true`, ending in `data: [DONE]`. Errors are JSON
in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status: a malformed
body or field (400), an unknown model (404), a prompt that with `max_tokens` exceeds a row (400:
refused, never truncated), a full queue (429, with Retry-After). Concurrent requests are decoded
together (`lab.batching`: continuous batching): a request joins the batch at the next step after a
row frees up and leaves when it ends, and no request sees another's state or changes another's
tokens. A client that disconnects mid-stream frees its row at the next step. A request without a
`seed` (or with seed -1) samples with a fresh one; the other sampling fields default to `generate.*`.
No request gets a 500: a field out of its range (Infinity, a seed beyond int64, a lone surrogate in
text) and a setting lab's own checks refuse are 400s, streaming or not. `GET /health` also says how
many requests' prompts are decoding (`running`) and waiting (`waiting`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Annotated, AsyncIterator, Literal, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from lab.batching import Batcher, Job, QueueFull
from lab.config_stages import Sampling
from lab.data.chat import Message
from lab.errors import ConfigError, LabError
from lab.generation import Completion
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
    kind = "requests" if status == 429 else "invalid_request_error" if status < 500 else "server_error"  # OpenAI's types
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status,
                        headers={"Retry-After": "1"} if status == 429 else None)


@dataclass
class Stats:
    """What the server did, logged to its MLflow run when it stops."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Server:
    """One model behind the API: its sampling defaults, the batcher that decodes every request, and
    the counts the run logs."""

    def __init__(self, tm: TextModel, defaults: Sampling, stats: Stats, batcher: Batcher):
        self.tm, self.defaults, self.stats, self.batcher = tm, defaults, stats, batcher

    async def answer(self, req: _Request, ids: list[list[int]], max_tokens: Optional[int], kind: str, choice, chunk):
        """The response to `req` for prompts `ids`: whole, or streamed as server-sent events. The batcher's
        thread hands text and ends over to this event loop through a queue; nothing here blocks it."""
        tm = self.tm
        if req.model != tm.name:
            raise APIError(404, f"the model {req.model!r} does not exist here; this server serves {tm.name!r}",
                           "model", "model_not_found")
        sampling = self.sampling(req, ids, max_tokens)
        jobs = [Job(p, sampling.reseeded(i)) for i, p in enumerate(ids)]  # a list's prompts: seed, seed + 1, ...
        head = {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": tm.name}
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        put = partial(loop.call_soon_threadsafe, pieces.put_nowait)  # (prompt, text), or (prompt, None) at its end
        for i, job in enumerate(jobs):
            job.on_done = partial(put, (i, None))
            if req.stream:
                job.on_text = partial(lambda i, text: put((i, text)), i)
        self.submit(jobs)
        if req.stream:
            return StreamingResponse(self.events(jobs, pieces, head, kind, chunk), media_type="text/event-stream")
        try:
            for _ in jobs:
                await pieces.get()
        finally:  # a request cancelled while it waits (its client gone) frees its rows
            for job in jobs:
                job.cancelled = True
        completions = [job.completion() for job in jobs]
        used = self.count(completions)
        prompt = sum(len(i) for i in ids)
        return head | {"object": kind, "choices": [choice(i, c) for i, c in enumerate(completions)],
                       "usage": {"prompt_tokens": prompt, "completion_tokens": used, "total_tokens": prompt + used}}

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's prompts, or answer 429 (OpenAI's shape) when the queue is full."""
        room = self.batcher.max_batch + self.batcher.max_queue
        if len(jobs) > room:  # never fits: retrying would not help
            raise APIError(400, f"prompt: this request has {len(jobs)} prompts, and this server holds at most {room} "
                                "(serve.max_batch + serve.max_queue); send fewer at once", "prompt")
        try:
            self.batcher.submit(jobs)
        except QueueFull as e:
            raise APIError(429, f"this server is busy: {e}; retry in a moment", code="rate_limit_exceeded") from None
        self.stats.requests += 1
        self.stats.prompt_tokens += sum(len(job.prompt) for job in jobs)

    def count(self, completions: list[Completion]) -> int:
        used = sum(len(c.ids) for c in completions)
        self.stats.completion_tokens += used
        return used

    def sampling(self, req: _Request, ids: list[list[int]], max_tokens: Optional[int]) -> Sampling:
        """The request's sampling settings over `generate.*`; refused where a row cannot hold them."""
        defaults, room = self.defaults, self.batcher.capacity
        where = ("this model's context is" if room == self.tm.context else
                 f"this server's rows hold (serve.kv_cache_gb over serve.max_batch={self.batcher.max_batch} rows)")
        longest = max(len(i) for i in ids)
        if max_tokens is not None and longest + max_tokens > room:
            raise APIError(400, f"{where} {room} tokens, but {longest + max_tokens} were requested "
                                f"({longest} in the prompt, {max_tokens} for the completion); shorten the prompt or "
                                "lower max_tokens", "max_tokens", "context_length_exceeded")
        if longest >= room:
            raise APIError(400, f"{where} {room} tokens, and the prompt alone is {longest}; shorten it", "prompt",
                           "context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or defaults.stop)
        chosen = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                  if getattr(req, k) is not None}
        seed = None if req.seed == -1 else req.seed  # None: a fresh seed
        return dataclasses.replace(defaults, **chosen, stop=stop, seed=seed,
                                   max_new_tokens=max_tokens or min(defaults.max_new_tokens, room - longest))

    async def events(self, jobs: list[Job], pieces: asyncio.Queue, head: dict, kind: str, chunk) -> AsyncIterator[str]:
        """Server-sent events: text as the batcher hands it over, each prompt's end, then [DONE]."""
        obj = f"{kind}.chunk" if kind.startswith("chat") else kind
        send = lambda body: f"data: {json.dumps(head | {'object': obj} | body)}\n\n"  # noqa: E731
        try:
            if kind.startswith("chat"):
                yield send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            open_jobs = len(jobs)
            while open_jobs:
                i, text = await pieces.get()
                if text is not None:
                    yield send({"choices": [chunk(i, text, None)]})
                    continue
                open_jobs -= 1
                if jobs[i].error is not None:
                    yield f"data: {json.dumps({'error': {'message': str(jobs[i].error), 'type': 'server_error'}})}\n\n"
                    return
            self.count([job.completion() for job in jobs])
            yield send({"choices": [chunk(i, "", job.row.finish_reason) for i, job in enumerate(jobs)]})
            yield "data: [DONE]\n\n"
        finally:  # a client that disconnected (this generator is cancelled, or closed) frees its rows at the next step
            for job in jobs:
                job.cancelled = True


def _server(request: Request) -> Server:
    return request.app.state.server


routes = APIRouter()


@routes.get("/health")
def health(server: Server = Depends(_server)) -> dict:
    return {"status": "ok"} | server.batcher.load()


@routes.get("/v1/models")
def models(server: Server = Depends(_server)) -> dict:
    return {"object": "list", "data": [{"id": server.tm.name, "object": "model", "created": int(time.time()),
                                        "owned_by": "lab"}]}


@routes.post("/v1/completions")
async def completions(req: CompletionRequest, server: Server = Depends(_server)):
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts or not all(prompts):
        raise APIError(400, "prompt: give a non-empty string (or a list of them)", "prompt")
    tokenizer = server.tm.tokenizer
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]  # plain text, template or not
    return await server.answer(req, ids, req.max_tokens, "text_completion", _text_choice, _text_chunk)


@routes.post("/v1/chat/completions")
async def chat(req: ChatRequest, server: Server = Depends(_server)):
    if server.tm.template is None:
        raise APIError(400, "this model has no chat template (it was not fine-tuned on chats); use /v1/completions, "
                            "or serve it with generate.template=<chatml | chat | ...>", "messages")
    try:
        ids = [server.tm.encode([Message(m.role, m.content) for m in req.messages])]
    except (LabError, ValueError) as e:
        raise APIError(400, f"messages: {e}", "messages") from None
    return await server.answer(req, ids, req.max_completion_tokens or req.max_tokens, "chat.completion", _chat_choice,
                               _chat_chunk)


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


def build_app(tm: TextModel, defaults: Sampling, stats: Stats, batcher: Optional[Batcher] = None) -> FastAPI:
    """The API over `tm`; `defaults` fill the sampling fields a request leaves out. `batcher` decodes
    the requests (None: one of 16 rows of the whole context, queueing 64, started here)."""
    if defaults.sbd_gamma is not None:
        raise ConfigError("generate.sbd_gamma: stage=serve decodes its requests together, a token per row per step; "
                          "Set Block Decoding decodes one prompt at a time: use it with stage=generate or chat")
    if batcher is None:
        batcher = Batcher(tm, 16, 64, tm.context)
        batcher.start()
    app = FastAPI(title=f"lab: {tm.name}")
    app.state.server = Server(tm, defaults, stats, batcher)
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
