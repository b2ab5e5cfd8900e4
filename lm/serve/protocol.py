"""The OpenAI-compatible request fields: checks that name the field, the chat template, and
the logprobs layouts of both endpoints.

Chat template (plain, role-tagged; one line per message, then the assistant's tag):

    System: You are terse.
    User: hello
    Assistant:

The model continues after `Assistant:`; generation stops at its end-of-sequence token, at
"\\nUser:" or "\\nSystem:" (added to any `stop` given), or at `max_tokens`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = ("\nUser:", "\nSystem:")
# The same template for clients that render it themselves (GET /tokenizer_info).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
MAX_LOGPROBS = 20
MAX_N = 64


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI's error body naming `param`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param)


@dataclasses.dataclass
class Sampling:
    """The per-request settings shared by both endpoints."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int = 0
    stream: bool = False
    include_usage: bool = False


def _int(body: dict, key: str, default, lo: int, hi: int | None = None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(key, f"must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise bad(key, f"must be in [{lo}, {hi}], got {v}" if hi is not None
                  else f"must be >= {lo}, got {v}")
    return v


def _float(body: dict, key: str, default: float, lo: float, hi: float, lo_open=False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(key, f"must be a number, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(key, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def boolean(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(key, f"must be true or false, got {v!r}")
    return v


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(404, f"model: the model {model!r} does not exist; this server serves "
                       f"{served!r}", "model", "model_not_found")


def sampling(body: dict, *, default_max_tokens: int | None, extra_stops=()) -> Sampling:
    """Reads the sampling fields (unknown fields are ignored, as clients send many)."""
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise bad(key, "not supported (only 0)")
    if body.get("logit_bias"):
        raise bad("logit_bias", "not supported")
    if body.get("best_of") not in (None, 1) and body.get("best_of") != body.get("n"):
        raise bad("best_of", "not supported (only equal to n)")
    max_tokens = _int(body, "max_tokens", None, 0)
    if max_tokens is None and "max_completion_tokens" in body:
        max_tokens = _int(body, "max_completion_tokens", None, 0)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad("stop", "must be a string or a list of strings")
    if any(s == "" for s in stops):
        raise bad("stop", "stop strings must not be empty")
    top_k = body.get("top_k")
    seed = _int(body, "seed", None, -(2**63), 2**64 - 1)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    return Sampling(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=0 if top_k == -1 else _int(body, "top_k", 0, 0),
        n=_int(body, "n", 1, 1, MAX_N),
        stop=stops + tuple(extra_stops),
        seed=random.getrandbits(32) if seed is None else seed % 2**32,
        stream=boolean(body, "stream"),
        include_usage=bool(options.get("include_usage", False)),
    )


def prompts(body: dict, encode, vocab_size: int) -> list[list[int]]:
    """`prompt` as a string, a list of strings, a list of token ids, or a list of lists of
    token ids -> one token list per prompt."""
    p = body.get("prompt")
    if p is None:
        raise bad("prompt", "is required")

    def ids(x: Any, where: str) -> list[int]:
        if isinstance(x, str):
            out = encode(x)
        elif isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in x):
            out = list(x)
            if any(t < 0 or t >= vocab_size for t in out):
                raise bad(where, f"token ids must be in [0, {vocab_size})")
        else:
            raise bad(where, "must be a string, a list of strings, a list of token ids or "
                      "a list of lists of token ids")
        if not out:
            raise bad(where, "is empty (at least one token is needed)")
        return out

    if isinstance(p, str):
        return [ids(p, "prompt")]
    if not isinstance(p, list) or not p:
        raise bad("prompt", "must be a non-empty string or list")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return [ids(p, "prompt")]
    return [ids(x, f"prompt[{i}]") for i, x in enumerate(p)]


def check_length(prompt: list[int], max_tokens: int, context: int, where: str) -> None:
    if len(prompt) > context:
        raise bad(where, f"{len(prompt)} tokens, longer than the model's maximum context "
                  f"length of {context} tokens")
    if len(prompt) + max_tokens > context:
        raise bad("max_tokens", f"{max_tokens} new tokens after a {len(prompt)}-token prompt "
                  f"exceed the model's maximum context length of {context} tokens")


def chat_prompt(body: dict) -> str:
    """The chat template applied to `messages` (see the module docstring)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role", f"must be one of {sorted(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text"
                       and isinstance(c.get("text"), str) for c in content):
                raise bad(f"messages[{i}].content", "only text parts are supported")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "must be a string")
        lines.append(f"{ROLES[m['role']]}: {content}\n")
    return "".join(lines) + "Assistant:"


def logprobs_count(body: dict, chat: bool) -> int | None:
    """How many alternatives to return per token, or None for no logprobs."""
    if chat:
        if not boolean(body, "logprobs"):
            if body.get("top_logprobs") is not None:
                raise bad("top_logprobs", "needs logprobs: true")
            return None
        return _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    return _int(body, "logprobs", None, 0, MAX_LOGPROBS)


def top_dict(top: list[tuple[int, float]], n: int, token_text) -> dict[str, float]:
    """The n most likely alternatives keyed by their text (the first of equal texts)."""
    out: dict[str, float] = {}
    for t, lp in top[:n]:
        out.setdefault(token_text(t), lp)
    return out


def completion_logprobs(tokens: list[int], lps: list[float | None],
                        tops: list[list[tuple[int, float]] | None], n: int, token_text,
                        offset: int = 0) -> dict:
    """The completions endpoint's layout: parallel lists of token texts, logprobs, top-n
    dicts and character offsets (None for an echoed first prompt token)."""
    texts = [token_text(t) for t in tokens]
    offsets, pos = [], offset
    for s in texts:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": texts, "token_logprobs": lps,
            "top_logprobs": [None if top is None else top_dict(top, n, token_text)
                             for top in tops],
            "text_offset": offsets}


def chat_logprobs(tokens: list[int], lps: list[float], tops: list[list[tuple[int, float]]],
                  n: int, token_text) -> dict:
    def entry(t: int, lp: float) -> dict:
        text = token_text(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top[:n]]}
                        for t, lp, top in zip(tokens, lps, tops, strict=True)]}
