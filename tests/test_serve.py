"""lm.serve on a tiny char-level GPT trained in the test: the official `openai` client and
lm-evaluation-harness talk to `python -m lm.serve`, and what they get equals what the
model computes directly (lm.generate for greedy text, a full forward pass for logprobs and
loglikelihoods)."""

from __future__ import annotations

import functools
import glob
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jax
import numpy as np
import openai
import pytest

from lm.data.tokenizers import SPECIAL_TOKENS
from lm.generate import generate
from lm.models.transformer import Decoder
from lm.sample import load_run
from tests.test_train import ROOT, corpus, run_main

KEY = "sk-test-serve"
CONTEXT = 64
WORDS = ["the", "king", "queen", "speaks", "to", "all", "men", "of", "rome", "and", "we",
         "shall", "not", "fear", "thee", "my", "lord", "good", "night"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    run_main(tmp / "run", f"--config.data.path={corpus(tmp)}", "--config.train.steps=40",
             f"--config.model.max_len={CONTEXT}", "--config.data.seq_len=32",
             "--config.optim.lr=1e-2", "--config.optim.warmup_steps=4")
    return tmp / "run"


@pytest.fixture(scope="module")
def model(run_dir):
    cfg, params, tok = load_run(str(run_dir))
    return cfg, params, tok


@pytest.fixture(scope="module")
def server(run_dir):
    port = free_port()
    log = open(run_dir.parent / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lm.serve", f"--workdir={run_dir}", f"--port={port}",
         f"--api_key={KEY}", "--slots=16", "--model_name=tiny"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, (run_dir.parent / "server.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", headers=auth()).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def greedy(model, prompt: str, n: int) -> str:
    """lm.generate's greedy continuation (cut at end-of-sequence)."""
    cfg, params, tok = model
    ids = tok.encode(prompt)
    eos = tok.special_id("</s>")
    out = generate(cfg, params, np.array([ids]), max_new_tokens=n, temperature=0.0,
                   eos_id=eos)[0, len(ids):].tolist()
    return tok.decode(out[:out.index(eos)] if eos in out else out)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids_1L, seg_1L):
    return jax.nn.log_softmax(Decoder(cfg).apply({"params": params}, ids_1L, seg_1L), axis=-1)


def forward_logprobs(model, ids: list[int]) -> np.ndarray:
    """[L - 1, V]: log p(. | ids[:i + 1]) from one full forward pass (padded to the
    context, so one compilation serves every length)."""
    cfg, params, _ = model
    pad = np.zeros((1, CONTEXT), np.int32)
    pad[0, :len(ids)] = ids
    seg = (np.arange(CONTEXT) < len(ids)).astype(np.int32)[None]
    return np.asarray(_forward(cfg, params, pad, seg))[0, :len(ids) - 1]


def prompt_of(i: int, length: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, 8))[:length]


# ------------------------------------------------------------------ the openai client
def test_completions_equal_lm_generate(client, model):
    # (prompt + max_tokens >= 32 here: lm.generate's window refill needs that much.)
    prompts = ["the king speaks", "good night my lord"]
    got = client.completions.create(model="tiny", prompt=prompts, max_tokens=24,
                                    temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    for prompt, choice in zip(prompts, got.choices, strict=True):
        assert choice.text == greedy(model, prompt, 24)
        assert choice.finish_reason == "length"
    assert got.usage.prompt_tokens == sum(map(len, prompts))
    assert got.usage.completion_tokens == 48

    stream = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=24,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == got.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24

    # A stop string cuts the text before it; echo puts the prompt in front.
    full = got.choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=24,
                                    temperature=0, stop=[stop], echo=True)
    assert cut.choices[0].text == prompts[0] + full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_completion_follows_the_template(client, model):
    messages = [{"role": "system", "content": "hi"},
                {"role": "user", "content": "the king"}]
    template = "System: hi\nUser: the king\nAssistant:"
    expected = greedy(model, template, 28)
    for stop in ("\nUser:", "\nSystem:"):
        expected = expected.split(stop)[0]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=28,
                                         temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected
    assert got.usage.prompt_tokens == len(template)
    parts = client.chat.completions.create(model="tiny", messages=messages, max_tokens=28,
                                           temperature=0, stream=True)
    chunks = list(parts)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    with_lp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=28,
                                             temperature=0, logprobs=True, top_logprobs=3)
    content = with_lp.choices[0].logprobs.content
    assert "".join(e.token for e in content).startswith(expected)
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(
            e.logprob, abs=1e-5)  # greedy: the chosen token is the most likely one


def test_logprobs_equal_a_full_forward_pass(client, model):
    _, _, tok = model
    prompt = "the queen speaks to"
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                    logprobs=5, echo=True).choices[0]
    ids = tok.encode(got.text)
    assert len(ids) == len(prompt) + 6 and got.text.startswith(prompt)
    ref = forward_logprobs(model, ids)
    lp = got.logprobs
    assert lp.tokens == list(got.text) and lp.text_offset == list(range(len(ids)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = ref[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=2e-5)
    for i, top in enumerate(lp.top_logprobs[1:]):
        best = np.argsort(-ref[i])[:5]
        np.testing.assert_allclose(sorted(top.values(), reverse=True), ref[i][best], atol=2e-5)
        # Token texts; special tokens by name.
        assert set(top) == {tok.decode([int(t)]) or SPECIAL_TOKENS[t] for t in best}


def test_sampling_settings(client, model):
    prompt = "we shall not"
    base = dict(model="tiny", prompt=prompt, max_tokens=26)
    one = client.completions.create(**base, temperature=1.0, seed=7, n=3)
    again = client.completions.create(**base, temperature=1.0, seed=7, n=3)
    assert [c.text for c in one.choices] == [c.text for c in again.choices]  # seeded
    assert len({c.text for c in one.choices}) > 1  # the n choices are independent draws
    top1 = client.completions.create(**base, temperature=1.5, seed=3, extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy(model, prompt, 26)  # top_k=1 is greedy


def test_32_concurrent_clients_are_batched_and_correct(client, server, model):
    jobs = [(prompt_of(i, 6 + 3 * (i % 4)), 0) for i in range(32)]
    jobs = [(p, 40 - len(p)) for p, _ in jobs]
    expected = [greedy(model, p, n) for p, n in jobs]
    steps0 = httpx.get(f"{server}/health", headers=auth()).json()["steps"]

    def ask(job):
        p, n = job
        return client.completions.create(model="tiny", prompt=p, max_tokens=n,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, jobs))
    assert got == expected
    steps = httpx.get(f"{server}/health", headers=auth()).json()["steps"] - steps0
    # 32 x ~30 tokens one by one would take ~1000 steps; 16 slots shared take ~2 x 34.
    assert steps < 250, steps


def test_a_client_leaving_mid_stream_does_not_hurt_others(client, server, model):
    body = {"model": "tiny", "prompt": "the king", "max_tokens": 50, "stream": True,
            "temperature": 1.0}
    others = [(prompt_of(100 + i, 10), 30) for i in range(6)]
    expected = [greedy(model, p, n) for p, n in others]

    def leave():
        with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=auth(),
                          timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # then drop the connection

    with ThreadPoolExecutor(12) as pool:
        leaving = [pool.submit(leave) for _ in range(6)]
        staying = [pool.submit(lambda j=j: client.completions.create(
            model="tiny", prompt=j[0], max_tokens=j[1], temperature=0).choices[0].text)
            for j in others]
        for f in leaving:
            f.result()
        assert [f.result() for f in staying] == expected
    deadline = time.time() + 30
    while httpx.get(f"{server}/health", headers=auth()).json()["active"]:
        assert time.time() < deadline, "cancelled streams kept their slots"
        time.sleep(0.2)
    assert client.completions.create(model="tiny", prompt=others[0][0], max_tokens=30,
                                     temperature=0).choices[0].text == expected[0]


def test_cancel_frees_the_slot_at_the_next_step(model):
    from lm.serve.engine import Engine, Seq

    cfg, params, tok = model
    engine = Engine(cfg, params, decode=tok.decode, eos_id=None, slots=2).start()
    try:
        done, events = threading.Event(), []

        def on_event(e):
            events.append(e)
            if e.kind == "token":
                seq.cancel()
            if e.kind == "done":
                done.set()

        seq = Seq(prompt=tok.encode("the"), max_tokens=60, on_event=on_event)
        engine.submit(seq)
        assert done.wait(120)
        assert events[-1].reason == "cancelled"
        assert len(seq.tokens) <= 2 and engine.seqs == [None, None]
    finally:
        engine.close()


# ------------------------------------------------------------------ errors and keys
@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "the", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "the", "model": "gpt-9"}, 404, "model"),
    ({"prompt": "x" * (CONTEXT + 1)}, 400, "prompt"),
    ({"prompt": "the king", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"prompt": "the", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "the", "top_p": 0}, 400, "top_p"),
    ({"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ({"prompt": "the", "logprobs": 50}, 400, "logprobs"),
    ({"max_tokens": 3}, 400, "prompt"),
])
def test_bad_requests_get_4xx_naming_the_field(server, body, status, param):
    r = httpx.post(f"{server}/v1/completions", json=body, headers=auth(), timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param)


def test_malformed_json_bad_chat_and_the_server_keeps_serving(server, client):
    r = httpx.post(f"{server}/v1/completions", content=b'{"prompt": "the",',
                   headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", headers=auth(),
                   json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.completions.create(model="gpt-9", prompt="the", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="the", max_tokens=-5)
    assert client.completions.create(model="tiny", prompt="the", max_tokens=2).choices
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_api_key_is_required(server):
    for headers in ({}, auth("sk-wrong"), {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("GET", "/health")):
            r = httpx.request(method, f"{server}{path}", headers=headers,
                              json={"prompt": "the"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="the", max_tokens=1)


# ------------------------------------------------------------------ lm-evaluation-harness
def test_lm_eval_multiple_choice_matches_our_loglikelihoods(server, model, tmp_path):
    _, _, tok = model
    rng = np.random.default_rng(0)
    docs = [{"context": " ".join(rng.choice(WORDS, 4)),
             "choices": [str(w) for w in rng.choice(WORDS, 3, replace=False)],
             "label": i % 3} for i in range(16)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "serve_mc.yaml").write_text(f"""task: serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    model_args = (f"base_url={server}/v1/completions,model=tiny,tokenizer_backend=remote,"
                  f"max_length={CONTEXT},num_concurrent=8,auth_token={KEY}")
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
         model_args, "--tasks", "serve_mc", "--include_path", str(tmp_path), "--output_path",
         str(tmp_path / "out"), "--log_samples"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(glob.glob(str(tmp_path / "out/**/results_*.json"),
                                       recursive=True)[0]))
    samples = [json.loads(line) for line in open(glob.glob(
        str(tmp_path / "out/**/samples_serve_mc_*.jsonl"), recursive=True)[0])]

    # Directly: log p(" " + choice | context), summed over the choice's tokens.
    ours, correct = {}, []
    for i, d in enumerate(docs):
        ctx = tok.encode(d["context"])
        scores = []
        for choice in d["choices"]:
            ids = tok.encode(d["context"] + " " + choice)
            lp = forward_logprobs(model, ids)
            scores.append(float(sum(lp[j - 1, ids[j]] for j in range(len(ctx), len(ids)))))
        ours[i] = scores
        correct.append(int(np.argmax(scores)) == d["label"])
    for s in samples:
        theirs = [float(r[0]) for r in s["filtered_resps"]]
        np.testing.assert_allclose(theirs, ours[s["doc_id"]], atol=1e-4)
    assert len(samples) == len(docs)
    assert results["results"]["serve_mc"]["acc,none"] == pytest.approx(np.mean(correct))


def test_cli_bad_input_is_one_line(tmp_path):
    nope = subprocess.run([sys.executable, "-m", "lm.serve", f"--workdir={tmp_path / 'nope'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert nope.returncode == 1
    assert nope.stderr.strip().splitlines()[-1] == (
        f"error: --workdir: no such directory: {tmp_path / 'nope'}")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"objective": "mlm_nsp"}))
    wrong = subprocess.run([sys.executable, "-m", "lm.serve", f"--workdir={tmp_path / 'bert'}",
                            "--slots=0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines()[-1] == "error: --slots=0: must be >= 1"
    bert = subprocess.run([sys.executable, "-m", "lm.serve", f"--workdir={tmp_path / 'bert'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bert.returncode == 1 and "needs a causal_lm run" in bert.stderr.splitlines()[-1]
