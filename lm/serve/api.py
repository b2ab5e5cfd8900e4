"""The HTTP API (FastAPI): OpenAI-style completions and chat completions (plain or as
server-sent events), models, health, and the tokenizer endpoints evaluation tools probe
(`/tokenizer_info`, `/tokenize`, `/detokenize`) so they need no tokenizer of their own.

Handlers only check requests and format answers; every sequence is decoded by the one
`Engine`, whose thread batches all requests in flight. Errors are OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status naming the field.
"""


import asyncio
import functools
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from lm.data.tokenizers import NUM_SPECIALS, SPECIAL_TOKENS
from lm.serve import protocol as P
from lm.serve.engine import Engine, Event, Seq


class Job:
    """The sequences of one request (prompts x n); their events meet on one asyncio queue."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.seqs: list[Seq] = []

    def add(self, prompt: list[int], s: P.Sampling, choice: int, prompt_logprobs: bool,
            logprobs: bool) -> None:
        index = len(self.seqs)

        def emit(event: Event) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        seq = Seq(prompt=prompt, max_tokens=s.max_tokens, on_event=emit,
                  temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                  seed=(s.seed + 7919 * choice) % 2**32, stop=s.stop,
                  prompt_logprobs=prompt_logprobs, logprobs=logprobs)
        self.seqs.append(seq)

    def start(self) -> None:
        for seq in self.seqs:
            self.engine.submit(seq)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        live = len(self.seqs)
        while live:
            index, event = await self.queue.get()
            if event.kind == "error":
                raise P.ApiError(500, f"decoding failed: {event.text}", kind="server_error")
            if event.kind == "done":
                live -= 1
            yield index, event

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()


class Choice:
    """What one sequence produced so far."""

    def __init__(self):
        self.tokens: list[int] = []
        self.lps: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.text = ""
        self.reason: str | None = None
        self.prompt_lps: list[float] | None = None
        self.prompt_tops: list[list[tuple[int, float]]] | None = None

    def take(self, event: Event) -> None:
        if event.kind == "prompt":
            self.prompt_lps, self.prompt_tops = event.prompt_logprobs, event.prompt_top
        elif event.kind == "token":
            self.tokens.append(event.token)
            self.lps.append(event.logprob)
            self.tops.append(event.top or [])
            self.text += event.text
        elif event.kind == "done":
            self.reason = "stop" if event.reason == "cancelled" else event.reason


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(engine: Engine, tokenizer: Any, model_name: str, api_key: str | None = None):
    """The FastAPI application serving `engine` under the name `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lm.serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    context, vocab = engine.context, engine.cfg.vocab_size

    @functools.lru_cache(maxsize=1 << 16)
    def token_text(t: int) -> str:
        s = tokenizer.decode([t])
        return SPECIAL_TOKENS[t] if not s and t < NUM_SPECIALS else s

    def error(e: P.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(P.ApiError)
    async def _api_error(request: Request, e: P.ApiError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return error(P.ApiError(e.status_code, f"{request.url.path}: {e.detail}"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(P.ApiError(401, "missing or wrong API key (send "
                                        "'Authorization: Bearer KEY')", None,
                                        "invalid_api_key"))
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise P.ApiError(400, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise P.ApiError(400, "the JSON body must be an object")
        return body

    def fitted(body: dict, prompt_len: int) -> int | None:
        """The default max_tokens when none is given: 16, or what still fits."""
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            return max(0, min(16, context - prompt_len))
        return None

    def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
        done = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                "total_tokens": prompt_tokens + done}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "slots": engine.slots,
                "active": sum(s is not None for s in engine.seqs),
                "waiting": len(engine.waiting), "steps": engine.steps}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                             "created": created, "owned_by": "lm",
                                             "max_model_len": context}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"eos_token": "</s>", "bos_token": "<s>", "pad_token": "[PAD]",
                "chat_template": P.CHAT_TEMPLATE, "model_max_length": context,
                "vocab_size": vocab}

    def encode(text: str) -> list[int]:
        special = tokenizer.special_id(text) if text in SPECIAL_TOKENS else None
        return [special] if special is not None else tokenizer.encode(text)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request)
        if "messages" in body:
            text = P.chat_prompt(body)
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise P.bad("prompt", "must be a string")
        ids = encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < vocab
                                                for t in ids):
            raise P.bad("tokens", f"must be a list of token ids in [0, {vocab})")
        return {"prompt": tokenizer.decode(ids)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        P.check_model(body, model_name)
        plist = P.prompts(body, tokenizer.encode, vocab)
        s = P.sampling(body, default_max_tokens=fitted(body, max(map(len, plist))))
        echo = P.boolean(body, "echo")
        n_lp = P.logprobs_count(body, chat=False)
        for i, p in enumerate(plist):
            P.check_length(p, s.max_tokens, context, "prompt" if len(plist) == 1
                           else f"prompt[{i}]")
        job = Job(engine)
        for p in plist:
            for j in range(s.n):
                job.add(p, s, j, prompt_logprobs=echo and n_lp is not None,
                        logprobs=n_lp is not None)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_text = [tokenizer.decode(p) for p in plist]
        n_prompt = sum(map(len, plist))

        def logprobs(tokens, lps, tops, offset: int = 0):
            if n_lp is None:
                return None
            return P.completion_logprobs(tokens, lps, tops, n_lp, token_text, offset)

        def echoed(c: Choice, index: int) -> tuple[list, list, list]:
            p = plist[index // s.n]
            if not (echo and c.prompt_lps is not None):
                return [], [], []
            return p, [None, *c.prompt_lps], [None, *c.prompt_tops]

        if not s.stream:
            choices = [Choice() for _ in job.seqs]
            job.start()
            try:
                async for index, event in job.events():
                    choices[index].take(event)
            finally:
                job.cancel()
            out = []
            for index, c in enumerate(choices):
                ptoks, plps, ptops = echoed(c, index)
                head = prompt_text[index // s.n] if echo else ""
                out.append({"index": index, "text": head + c.text,
                            "logprobs": logprobs(ptoks + c.tokens, plps + c.lps,
                                                 ptops + c.tops),
                            "finish_reason": c.reason})
            return {"id": rid, "object": "text_completion", "created": now,
                    "model": model_name, "choices": out, "usage": usage(n_prompt, choices)}

        def chunk(index: int, text: str, lp=None, reason=None) -> str:
            return sse({"id": rid, "object": "text_completion", "created": now,
                        "model": model_name, "choices": [{"index": index, "text": text,
                                                          "logprobs": lp,
                                                          "finish_reason": reason}]})

        async def stream():
            choices = [Choice() for _ in job.seqs]
            offsets = [0] * len(choices)
            job.start()
            try:
                if echo and n_lp is None:
                    for index in range(len(choices)):
                        offsets[index] = len(prompt_text[index // s.n])
                        yield chunk(index, prompt_text[index // s.n])
                async for index, event in job.events():
                    c = choices[index]
                    c.take(event)
                    if event.kind == "prompt" and echo:
                        ptoks, plps, ptops = echoed(c, index)
                        text = prompt_text[index // s.n]
                        yield chunk(index, text, logprobs(ptoks, plps, ptops))
                        offsets[index] = len(text)
                    elif event.kind == "token":
                        lp = logprobs([event.token], [event.logprob], [event.top],
                                      offsets[index])
                        offsets[index] += len(event.text)
                        if event.text or lp is not None:
                            yield chunk(index, event.text, lp)
                    elif event.kind == "done":
                        yield chunk(index, "", None, c.reason)
                if s.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": now,
                               "model": model_name, "choices": [],
                               "usage": usage(n_prompt, choices)})
                yield "data: [DONE]\n\n"
            except P.ApiError as e:
                yield sse(e.body())
            finally:  # also when the client goes away: frees the slots at the next step
                job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        P.check_model(body, model_name)
        prompt = tokenizer.encode(P.chat_prompt(body))
        s = P.sampling(body, default_max_tokens=None, extra_stops=P.CHAT_STOPS)
        if s.max_tokens is None:
            s.max_tokens = max(0, context - len(prompt))
        n_lp = P.logprobs_count(body, chat=True)
        P.check_length(prompt, s.max_tokens, context, "messages")
        job = Job(engine)
        for j in range(s.n):
            job.add(prompt, s, j, prompt_logprobs=False, logprobs=n_lp is not None)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def lp_of(tokens, lps, tops):
            return None if n_lp is None else P.chat_logprobs(tokens, lps, tops, n_lp,
                                                             token_text)

        if not s.stream:
            choices = [Choice() for _ in job.seqs]
            job.start()
            try:
                async for index, event in job.events():
                    choices[index].take(event)
            finally:
                job.cancel()
            out = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": lp_of(c.tokens, c.lps, c.tops), "finish_reason": c.reason}
                   for i, c in enumerate(choices)]
            return {"id": rid, "object": "chat.completion", "created": now,
                    "model": model_name, "choices": out,
                    "usage": usage(len(prompt), choices)}

        def chunk(index: int, delta: dict, lp=None, reason=None) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": now,
                        "model": model_name, "choices": [{"index": index, "delta": delta,
                                                          "logprobs": lp,
                                                          "finish_reason": reason}]})

        async def stream():
            choices = [Choice() for _ in job.seqs]
            job.start()
            try:
                for index in range(len(choices)):
                    yield chunk(index, {"role": "assistant", "content": ""})
                async for index, event in job.events():
                    c = choices[index]
                    c.take(event)
                    if event.kind == "token":
                        lp = lp_of([event.token], [event.logprob], [event.top])
                        if event.text or lp is not None:
                            yield chunk(index, {"content": event.text}, lp)
                    elif event.kind == "done":
                        yield chunk(index, {}, None, c.reason)
                if s.include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": now,
                               "model": model_name, "choices": [],
                               "usage": usage(len(prompt), choices)})
                yield "data: [DONE]\n\n"
            except P.ApiError as e:
                yield sse(e.body())
            finally:
                job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app
