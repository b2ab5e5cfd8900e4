"""Continuous batching: one thread runs decode steps over a fixed set of cache slots, and
sequences join and leave between any two steps.

Why continuous (iteration-level) rather than static batches: requests differ in prompt
and output length, so a batch formed once would hold every slot until its longest member
finished and make new requests wait for it. Here a finished sequence frees its slot at
once and a waiting one is prefilled into it before the next step, so a short request
never waits for a long one and throughput grows with the number of concurrent requests
up to the slot count. The host fetches a step's tokens while the device runs the next
step (stop decisions are made one step late; that row's extra token is discarded).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.models.config import ModelConfig
from lm.models.transformer import Decoder
from lm.serve import slots as dev

log = logging.getLogger("lm.serve")


@dataclasses.dataclass
class Event:
    """What a sequence reports: `kind` is 'prompt' (echo logprobs of prompt tokens 1..),
    'token' (one sampled token; `text` is the newly visible text, possibly empty while a
    stop string may be forming), 'done' (`reason`: stop / length / cancelled) or 'error'."""

    kind: str
    token: int = -1
    logprob: float = 0.0
    top: list[tuple[int, float]] | None = None
    text: str = ""
    reason: str = ""
    prompt_logprobs: list[float] | None = None
    prompt_top: list[list[tuple[int, float]]] | None = None


@dataclasses.dataclass(eq=False)
class Seq:
    """One sequence to complete (a prompt x one of its `n` choices)."""

    prompt: list[int]
    max_tokens: int
    on_event: Callable[[Event], None]
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    prompt_logprobs: bool = False
    logprobs: bool = False  # top alternatives of each sampled token wanted
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    shown: int = 0  # characters of `text` already reported
    finished: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


def _bucket(n: int, cap: int, base: int = 2, least: int = 16) -> int:
    """The next power of `base` >= n (at least `least`), capped: few shapes, few
    compilations."""
    b = 1
    while b < max(n, least):
        b *= base
    return min(cap, b)


def _top(ids: np.ndarray, lps: np.ndarray) -> list[tuple[int, float]]:
    return [(int(i), float(p)) for i, p in zip(ids, lps, strict=True)]


class Engine:
    """Serves `Seq`s over `slots` cache rows of `context` tokens (prompt + completion)."""

    def __init__(self, cfg: ModelConfig, params: Any, *, decode: Callable[[list[int]], str],
                 eos_id: int | None, slots: int = 32, context: int | None = None):
        self.context = int(context or cfg.max_len)
        if cfg.position == "learned" and self.context > cfg.max_len:
            raise ValueError(f"--context: {self.context} exceeds the model's max_len "
                             f"{cfg.max_len} (learned positions)")
        self.cfg, self.slots, self.eos_id, self._decode = cfg, slots, eos_id, decode
        self.params = jax.device_put(params)
        self.model = Decoder(cfg, decode=True, cache_len=self.context)
        self.full_model = Decoder(cfg)
        self.cache = dev.empty_cache(self.model, slots)
        self.head = dev.pick_table(self.model, self.params)
        self.ids = jnp.zeros((slots,), jnp.int32)
        self.column = 0
        self.seqs: list[Seq | None] = [None] * slots
        self.pos = np.zeros(slots, np.int32)
        self.count = np.zeros(slots, np.int32)
        self.seeds = np.zeros(slots, np.uint32)
        self.temp = np.zeros(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)
        self.top_p = np.ones(slots, np.float32)
        self.waiting: collections.deque[Seq] = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="lm.serve.engine", daemon=True)

    # ------------------------------------------------------------------ client side
    def start(self) -> Engine:
        self.thread.start()
        return self

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    def submit(self, seq: Seq) -> None:
        """Queues `seq`; its events arrive on `seq.on_event` from the engine thread. The
        caller has checked len(prompt) + max_tokens <= context and len(prompt) >= 1."""
        with self.cond:
            self.waiting.append(seq)
            self.cond.notify()

    def warmup(self) -> None:
        """Compiles the decode step (and a small prefill) before the first request."""
        done = threading.Event()
        self.submit(Seq(prompt=[0, 0], max_tokens=1, temperature=0.0,
                        on_event=lambda e: done.set() if e.kind in ("done", "error") else None))
        done.wait()

    def precompile(self, prompt_len: int) -> None:
        """Compiles the step for every occupied-prefix size and the prefill for every
        batch size at `prompt_len`, so no request of that length waits for a compiler
        (call before `start`; a benchmark wants this, a test does not)."""
        cache = dev.empty_cache(self.model, self.slots)
        ids = jnp.zeros((self.slots,), jnp.int32)
        rows = 1
        while True:
            k = _bucket(rows, self.slots, least=1)
            z = np.zeros(k, np.int32)
            cache, ids, *_ = dev.step(self.model, self.params, cache, ids, z, z > 0,
                                      jnp.int32(0), z.astype(np.uint32), z,
                                      z.astype(np.float32), z, np.ones(k, np.float32),
                                      jnp.asarray(False), self.head, rows=k)
            if k == self.slots:
                break
            rows = k + 1
        length = _bucket(prompt_len - 1, self.context)
        k = 1
        while True:
            k = _bucket(k, self.slots, base=4, least=1)
            rows_ = dev.prefill(self.model, self.params, jnp.zeros((k, length), jnp.int32),
                                jnp.zeros((k,), jnp.int32))
            cache = dev.insert(cache, rows_, jnp.full((k,), self.slots, jnp.int32),
                               jnp.zeros((k,), jnp.int32))
            if k == self.slots:
                break
            k += 1
        jax.block_until_ready(cache)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        inflight = None
        while True:
            with self.cond:
                while (not self.closed and not self.waiting and inflight is None
                       and not any(self.seqs)):
                    self.cond.wait()
                if self.closed:
                    return
                admitted = self._take_waiting()
            try:
                if admitted:
                    self._admit(admitted)
                launched = self._dispatch() if any(self.seqs) else None
                if inflight is not None:
                    self._process(*inflight)
                inflight = launched
            except Exception as e:  # a bug must not kill the server: fail what was running
                log.exception("engine step failed")
                for seq in [*self.seqs, *admitted]:
                    if seq is not None and not seq.finished:
                        seq.finished = True
                        seq.on_event(Event("error", text=f"{type(e).__name__}: {e}"))
                self.seqs = [None] * self.slots
                inflight = None

    def _take_waiting(self) -> list[Seq]:
        free = sum(s is None for s in self.seqs)
        out = []
        while self.waiting and len(out) < free:
            seq = self.waiting.popleft()
            if seq.cancelled:
                seq.finished = True
                seq.on_event(Event("done", reason="cancelled"))
            else:
                out.append(seq)
        return out

    def _admit(self, seqs: list[Seq]) -> None:
        scored = [s for s in seqs if s.prompt_logprobs]
        for i in range(0, len(scored), 8):
            self._score(scored[i:i + 8])
        decoding = []
        for seq in seqs:
            if seq.max_tokens == 0:
                seq.finished = True
                seq.on_event(Event("done", reason="length"))
            else:
                decoding.append(seq)
        if not decoding:
            return
        free = [i for i, s in enumerate(self.seqs) if s is None]
        k = _bucket(len(decoding), self.slots, base=4, least=1)
        length = _bucket(max(len(s.prompt) - 1 for s in decoding), self.context)
        ids = np.zeros((k, length), np.int32)
        lengths = np.zeros(k, np.int32)
        slot_ids = np.full(k, self.slots, np.int32)  # out of range: dropped by insert
        shifts = np.zeros(k, np.int32)
        last = np.zeros(k, np.int32)
        for j, seq in enumerate(decoding):
            n = len(seq.prompt) - 1
            ids[j, :n] = seq.prompt[:-1]
            lengths[j], slot_ids[j] = n, free[j]
            shifts[j] = (self.column - n) % self.context
            last[j] = seq.prompt[-1]
            slot = free[j]
            self.seqs[slot] = seq
            self.pos[slot], self.count[slot] = n, 0
            self.seeds[slot] = np.uint32(seq.seed & 0xFFFFFFFF)
            self.temp[slot], self.top_k[slot], self.top_p[slot] = (
                seq.temperature, seq.top_k, seq.top_p)
        rows = dev.prefill(self.model, self.params, jnp.asarray(ids), jnp.asarray(lengths))
        self.cache = dev.insert(self.cache, rows, jnp.asarray(slot_ids), jnp.asarray(shifts))
        self.ids = self.ids.at[jnp.asarray(slot_ids)].set(jnp.asarray(last), mode="drop")

    def _score(self, seqs: list[Seq]) -> None:
        """Echo logprobs: one full forward pass over the prompts."""
        k = _bucket(len(seqs), 8, base=8, least=1)
        length = _bucket(max(len(s.prompt) for s in seqs), self.context)
        ids = np.zeros((k, length), np.int32)
        lengths = np.zeros(k, np.int32)
        for j, seq in enumerate(seqs):
            ids[j, :len(seq.prompt)] = seq.prompt
            lengths[j] = len(seq.prompt)
        tok_lp, top_ids, top_lp = (np.asarray(a) for a in dev.score(
            self.full_model, self.params, jnp.asarray(ids), jnp.asarray(lengths)))
        for j, seq in enumerate(seqs):
            n = len(seq.prompt) - 1
            seq.on_event(Event("prompt", prompt_logprobs=tok_lp[j, :n].tolist(),
                               prompt_top=[_top(top_ids[j, i], top_lp[j, i]) for i in range(n)]))

    def _dispatch(self):
        active = np.array([s is not None for s in self.seqs])
        k = _bucket(int(np.flatnonzero(active)[-1]) + 1, self.slots, least=1)
        out = dev.step(self.model, self.params, self.cache, self.ids,
                       jnp.asarray(np.minimum(self.pos[:k], self.context - 1)),
                       jnp.asarray(active[:k]), jnp.int32(self.column),
                       jnp.asarray(self.seeds[:k]), jnp.asarray(self.count[:k]),
                       jnp.asarray(self.temp[:k]), jnp.asarray(self.top_k[:k]),
                       jnp.asarray(self.top_p[:k]),
                       jnp.asarray(any(s is not None and s.logprobs for s in self.seqs)),
                       self.head, rows=k)
        self.cache, self.ids = out[0], out[1]
        snapshot = [(i, s) for i, s in enumerate(self.seqs) if s is not None]
        self.pos[active] += 1
        self.count[active] += 1
        self.column = (self.column + 1) % self.context
        self.steps += 1
        return out[1:], snapshot

    def _process(self, out, snapshot) -> None:
        tok, tok_lp, top_ids, top_lp = (np.asarray(a) for a in out)  # [rows] each
        for slot, seq in snapshot:
            if seq.finished:
                continue
            if seq.cancelled:
                self._finish(slot, seq, "cancelled")
                continue
            t = int(tok[slot])
            seq.tokens.append(t)
            reason = ""
            if t == self.eos_id:
                reason = "stop"
            else:
                seq.text = self._decode(seq.tokens)
            visible, hit = self._visible(seq)
            if hit:
                reason = "stop"
            elif len(seq.tokens) >= seq.max_tokens:
                reason = reason or "length"
            if reason and not hit:  # nothing more is coming: show what was held back
                visible = len(seq.text)
            delta = seq.text[seq.shown:visible]
            seq.shown = max(seq.shown, visible)
            seq.on_event(Event("token", token=t, logprob=float(tok_lp[slot]),
                               top=_top(top_ids[slot], top_lp[slot]) if seq.logprobs else None,
                               text=delta))
            if reason:
                self._finish(slot, seq, reason)

    def _visible(self, seq: Seq) -> tuple[int, bool]:
        """(how much of the text may be shown, whether a stop string was completed). Text
        that could still become a stop string, or an unfinished UTF-8 character, waits."""
        text = seq.text
        hits = [i for s in seq.stop if (i := text.find(s, max(0, seq.shown - len(s) + 1))) >= 0]
        if hits:
            cut = min(hits)
            seq.text = text[:cut]
            return cut, True
        hold = 0
        for s in seq.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        if text.endswith("\ufffd"):
            hold = max(hold, 1)
        return max(seq.shown, len(text) - hold), False

    def _finish(self, slot: int, seq: Seq, reason: str) -> None:
        seq.finished = True
        if self.seqs[slot] is seq:
            self.seqs[slot] = None
        seq.on_event(Event("done", reason=reason))
