"""`python -m lm.demo --workdir=RUN [--port=7860] [--host=127.0.0.1] [--step=N]`: a Gradio
app for a trained run, chosen by the run's objective:

  causal_lm       text generation (temperature, top-k, top-p, max new tokens, seed)
  classification  label scores (softmax over the run's labels; a tab separates a pair)
  tagging         the text with its entities highlighted

Gradio is an optional extra (`pip install -e '.[demo]'`). The logic (loading, generating,
scoring, grouping tags into entities) lives in plain functions here, usable without Gradio;
the page is only their front end. Errors before serving are one line, exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Generation settings the page starts with (and their slider ranges).
GENERATION_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=1.0, max_new_tokens=64, seed=0)
PROMPT_LABEL, OUTPUT_LABEL, BUTTON = "prompt", "completion", "Generate"


def run_objective(workdir: str) -> str:
    """The `objective` of a run's config.json (one-line error when it is not a run)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir: no config.json in {workdir} (not a run directory)")
    with open(path) as f:
        return str(json.load(f).get("objective", ""))


# ----------------------------------------------------------------------------- causal LM


@dataclasses.dataclass
class Generator:
    """A causal-LM run loaded once; `complete` continues a prompt with `lm.generate`."""

    model_cfg: Any
    params: Any
    tokenizer: Any

    @classmethod
    def load(cls, workdir: str, step: int | None = None) -> Generator:
        from lm.sample import load_run

        return cls(*load_run(workdir, step))

    def complete(self, prompt: str, *, temperature: float, top_k: int, top_p: float,
                 max_new_tokens: int, seed: int = 0) -> str:
        """The prompt's continuation (the generated text only, specials dropped)."""
        from lm.generate import generate

        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("prompt: encodes to no tokens")
        out = generate(self.model_cfg, self.params, np.asarray([ids], np.int32),
                       max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                       top_k=int(top_k), top_p=float(top_p), seed=int(seed),
                       eos_id=self.tokenizer.special_id("</s>"))
        return self.tokenizer.decode(out[0, len(ids):].tolist())


# ----------------------------------------------------------------------------- fine-tuned runs


@dataclasses.dataclass
class Predictor:
    """A classification or tagging run loaded once (see `lm.predict.load_run`)."""

    objective: Any
    model: Any
    params: Any

    @classmethod
    def load(cls, workdir: str, step: int | None = None) -> Predictor:
        from lm.predict import load_run

        return cls(*load_run(workdir, step))

    def label_scores(self, text: str) -> dict[str, float]:
        """Softmax probability of every label for one text (a tab separates a pair)."""
        from lm.data import labelled

        obj = self.objective
        first, sep, second = text.partition("\t")
        example = labelled.TextExample(first, second if sep else None, obj.labels[0])
        source = labelled.classification_source(obj.tokenizer, [example], obj.labels,
                                                obj.seq_len)
        logits = np.asarray(obj.logits_fn(self.model)(self.params, source.arrays), np.float64)
        probs = np.exp(logits[0] - logits[0].max())
        probs /= probs.sum()
        return {label: float(p) for label, p in zip(obj.labels, probs, strict=True)}

    def entities(self, text: str) -> list[tuple[str, str | None]]:
        """(span, entity type or None) pieces covering the text's words in order: B-/I-/E-/S-
        tags of one type are joined into one entity (`lm.predict`'s `word/TAG` output)."""
        (line,) = self.objective.predict(self.model, self.params, [text])
        return group_entities([tuple(p.rsplit("/", 1)) for p in line.split(" ") if p])


def group_entities(word_tags: Sequence[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """[(word, BIOES tag)] -> [(text, type or None)]: consecutive words of one entity are
    joined with spaces; an entity starts at B-/S-, or at I-/E- after another type or O."""
    out: list[tuple[str, str | None]] = []
    open_type: str | None = None
    for word, tag in word_tags:
        prefix, _, kind = tag.partition("-")
        if prefix == "O" or not kind:
            out.append((word, None))
            open_type = None
        elif prefix in ("B", "S") or kind != open_type:
            out.append((word, kind))
            open_type = None if prefix in ("S", "E") else kind
        else:  # I- or E- continuing the open entity
            out[-1] = (f"{out[-1][0]} {word}", kind)
            open_type = None if prefix == "E" else kind
    return out


# ----------------------------------------------------------------------------- the page


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("lm.demo needs gradio: pip install -e '.[demo]'") from None
    return gr


def build_app(workdir: str, step: int | None = None) -> Any:
    """The Gradio Blocks app for the run's objective (nothing is served yet)."""
    objective = run_objective(workdir)
    gr = _gradio()
    title = f"lm demo: {os.path.basename(os.path.abspath(workdir))} ({objective})"
    if objective == "causal_lm":
        gen = Generator.load(workdir, step)
        d = GENERATION_DEFAULTS
        with gr.Blocks(title=title, analytics_enabled=False) as app:
            gr.Markdown(f"### {title}")
            prompt = gr.Textbox(label=PROMPT_LABEL, lines=4, value="")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=d["temperature"], step=0.05,
                                        label="temperature (0 = greedy)")
                top_k = gr.Slider(0, 200, value=d["top_k"], step=1, label="top-k (0 = all)")
                top_p = gr.Slider(0.05, 1.0, value=d["top_p"], step=0.05, label="top-p")
                max_new = gr.Slider(1, 512, value=d["max_new_tokens"], step=1,
                                    label="max new tokens")
                seed = gr.Number(value=d["seed"], precision=0, label="seed")
            button = gr.Button(BUTTON, variant="primary")
            output = gr.Textbox(label=OUTPUT_LABEL, lines=10)

            def run(text, t, k, p, n, s):
                return gen.complete(text, temperature=t, top_k=k, top_p=p, max_new_tokens=n,
                                    seed=s)

            button.click(run, [prompt, temperature, top_k, top_p, max_new, seed], output)
        return app
    if objective not in ("classification", "tagging"):
        raise ValueError(f"objective: {objective!r} has no demo (causal_lm, classification, "
                         "tagging)")
    pred = Predictor.load(workdir, step)
    fn: Callable[[str], Any]
    if objective == "classification":
        out_component = gr.Label(label="label scores", num_top_classes=len(pred.objective.labels))
        fn, button_text = pred.label_scores, "Classify"
    else:
        out_component = gr.HighlightedText(label="entities", combine_adjacent=False)
        fn, button_text = pred.entities, "Tag"
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"### {title}")
        text = gr.Textbox(label="text", lines=3)
        button = gr.Button(button_text, variant="primary")
        out_component.render()
        button.click(fn, text, out_component)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        if not os.path.isdir(args.workdir):
            raise FileNotFoundError(f"--workdir: no such directory: {args.workdir}")
        if not 0 < args.port < 65536:
            raise ValueError(f"--port={args.port}: must be in 1..65535")
        app = build_app(os.path.abspath(args.workdir), args.step)
    except (ValueError, FileNotFoundError, ImportError, KeyError) as e:
        print(f"error: {str(e).strip(chr(39) + chr(34))}", file=sys.stderr)
        sys.exit(1)
    print(f"serving {args.workdir} on http://{args.host}:{args.port}", flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
               show_error=True)


if __name__ == "__main__":
    main()
