"""`lm.demo`: the handlers behind each page, and the text-generation page end to end in a real
browser (Debian's chromium driven by Playwright) against `python -m lm.demo` on localhost."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lm import demo
from tests.test_finetune import classification_run, tagging_run  # noqa: F401 (fixtures)
from tests.test_train import make_config

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from lm import train

    tmp = tmp_path_factory.mktemp("clm")
    train.train_and_evaluate(make_config(tmp, **{"train.steps": 6}), str(tmp / "run"))
    return tmp / "run"


def test_group_entities():
    tags = [("John", "B-PER"), ("Smith", "I-PER"), ("visited", "O"), ("New", "B-LOC"),
            ("York", "E-LOC"), ("and", "O"), ("Acme", "S-ORG"), ("Bob", "I-PER"),
            ("Lee", "I-PER"), ("Paris", "B-LOC"), ("Rome", "B-LOC")]
    assert demo.group_entities(tags) == [
        ("John Smith", "PER"), ("visited", None), ("New York", "LOC"), ("and", None),
        ("Acme", "ORG"), ("Bob Lee", "PER"), ("Paris", "LOC"), ("Rome", "LOC")]


def test_generator_matches_lm_generate(lm_run):
    from lm.generate import generate
    from lm.sample import load_run

    cfg, params, tok = load_run(str(lm_run))
    settings = dict(temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=12, seed=3)
    ids = tok.encode("the king")
    want = generate(cfg, params, np.asarray([ids], np.int32), eos_id=tok.special_id("</s>"),
                    **settings)
    got = demo.Generator.load(str(lm_run)).complete("the king", **settings)
    assert got == tok.decode(want[0, len(ids):].tolist()) and len(got) > 0


def test_label_scores_and_entities(classification_run, tagging_run):  # noqa: F811
    from lm.predict import load_run

    pred = demo.Predictor.load(str(classification_run))
    scores = pred.label_scores("the film was great")
    assert sorted(scores) == ["neg", "pos"] and sum(scores.values()) == pytest.approx(1.0)
    obj, model, params = load_run(str(classification_run))
    (line,) = obj.predict(model, params, ["the film was great"])
    label, score, _ = line.split("\t", 2)
    assert max(scores, key=scores.get) == label
    assert scores[label] == pytest.approx(float(score), abs=1e-4)  # same number as lm.predict

    tagger = demo.Predictor.load(str(tagging_run))
    spans = tagger.entities("John Johanson visited Paris .")
    assert " ".join(s for s, _ in spans) == "John Johanson visited Paris ."
    labels = {"PER", "LOC", "ORG", None}
    assert all(kind in labels for _, kind in spans)


def test_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lm.demo", f"--workdir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: --workdir: no config.json in {tmp_path} (not a run directory)"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"lm.demo exited with {proc.returncode}: "
                                 f"{proc.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"lm.demo did not answer at {url} in {timeout_s} s")


def test_generation_page_in_a_browser(lm_run, tmp_path):
    pytest.importorskip("gradio", reason="gradio not installed (pip install -e '.[demo]')")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright not installed (pip install playwright)")
    if not os.path.exists(CHROMIUM) or not shutil.which(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install -y chromium)")
    prompt = "the queen"
    d = demo.GENERATION_DEFAULTS
    want = demo.Generator.load(str(lm_run)).complete(
        prompt, temperature=d["temperature"], top_k=d["top_k"], top_p=d["top_p"],
        max_new_tokens=d["max_new_tokens"], seed=d["seed"])
    assert want.strip(), "the model's completion is empty: nothing to look for on the page"
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "JAX_PLATFORMS": "cpu"}
    server = subprocess.Popen([sys.executable, "-m", "lm.demo", f"--workdir={lm_run}",
                               f"--port={port}"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for(url, server)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url, wait_until="domcontentloaded")
            box = page.get_by_label(demo.PROMPT_LABEL)
            box.fill(prompt)
            page.get_by_role("button", name=demo.BUTTON).click()
            output = page.get_by_label(demo.OUTPUT_LABEL)
            page.wait_for_function(
                "el => el.value.length > 0", arg=output.element_handle(), timeout=120_000)
            got = output.input_value()
            if os.environ.get("LM_DEMO_SCREENSHOT"):
                page.screenshot(path=os.environ["LM_DEMO_SCREENSHOT"])
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert got == want


def test_confusion_matrix_and_validation_predictions(classification_run):  # noqa: F811
    from lm import metrics
    from lm.predict import validation_predictions

    counts = metrics.confusion_matrix(["a", "b", "b", "a", "b"], ["a", "b", "a", "a", "b"],
                                      ["a", "b"])
    assert counts.tolist() == [[2, 0], [1, 2]]
    gold, predicted, labels = validation_predictions(str(classification_run))
    assert labels == ["neg", "pos"] and len(gold) == len(predicted) == 8  # data.val_size
    assert set(gold) <= set(labels) and set(predicted) <= set(labels)
    counts = metrics.confusion_matrix(gold, predicted, labels)
    assert counts.sum() == 8
    # the run's own eval accuracy is the confusion matrix's diagonal
    from tests.test_finetune import read_metrics as finetune_metrics

    accuracy = finetune_metrics(classification_run)["eval/accuracy"]
    assert counts.trace() / counts.sum() == pytest.approx(accuracy, abs=1e-6)
