"""Training-step throughput: our jitted step vs Hugging Face transformers (PyTorch eager)
on the same shape, alternating A B A B (each round runs each side in a fresh process),
plus this machine's GEMM ceiling.

  gpt   our causal-LM step vs GPT2LMHeadModel (4 layers, width 256, 4 heads, seq 128,
        batch 16, vocab 50257, AdamW)
  bert  our MLM + NSP step vs BertForPreTraining (same shape, vocab 30522, 20 predictions
        per sequence)
  char  the `char_lm:baby` step (4 layers, width 128, 4 heads, block 64, batch 12, vocab 65,
        no biases, AdamW + clipping) vs the same model in PyTorch eager
        (benchmarks/char_lm_peer.py)

One JSON line per measurement (what, impl, config, tokens/s, step time, model GFLOP/s,
fraction of the measured GEMM ceiling, peak memory), then one line per ratio.

`--eval` times the validation forward instead (ours: the objective's jitted eval
metrics; char's peer: the forward and the summed cross-entropy under `torch.no_grad`,
as `benchmarks/char_lm_peer.py` evaluates) on `--batch` rows.

    python benchmarks/train_step.py --model gpt --dtype float32 --rounds 3
    python benchmarks/train_step.py --model gpt --dtype bfloat16
    python benchmarks/train_step.py --model char --steps 50
    python benchmarks/train_step.py --model char --eval --batch 64 --steps 20
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lm import optim, reporting, runtime, sharding, train
from lm.config_base import base_config, model_config, to_model_config
from lm.objectives import get as get_objective
from lm.runtime import cpu_flags

SHAPE = dict(layers=4, width=256, heads=4, seq=128, batch=16)
CHAR_SHAPE = dict(layers=4, width=128, heads=4, seq=64, batch=12)
VOCAB = {"gpt": 50257, "bert": 30522, "char": 65}
PREDICTIONS = 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gemm_ceiling(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype` (fp32 accumulation for bf16)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, a))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# ------------------------------------------------------------------------ ours
def our_config(kind: str, dtype: str, preset: str = "", attention_impl: str = "einsum",
               remat: str = "none", scan: bool = False, loss_chunk: int | None = None
               ) -> ConfigDict:
    c = base_config()
    s = SHAPE
    if kind == "char":
        c = _config_file("char_lm", "baby")
        c.model.update(vocab_size=VOCAB[kind], dtype=dtype, attention_impl=attention_impl,
                       remat=remat, scan_layers=scan, max_len=s["seq"])
        c.data.seq_len, c.train.batch_size = s["seq"], s["batch"]
        if loss_chunk is not None:
            c.train.loss_chunk = loss_chunk
        return c
    if kind == "gpt":
        c.objective = "causal_lm"
        shape = {} if preset else dict(num_layers=s["layers"], d_model=s["width"],
                                       num_heads=s["heads"], mlp_dim=4 * s["width"])
        c.model = model_config(preset or "gpt2_small", **shape, max_len=s["seq"],
                               vocab_size=VOCAB[kind], dropout_rate=0.0,
                               attention_dropout_rate=0.0, dtype=dtype,
                               attention_impl=attention_impl, remat=remat, scan_layers=scan)
    else:
        c = _config_file("bert", "mini")  # BERT data options (the corpus is never read)
        c.model = model_config("bert_mini", num_layers=s["layers"], d_model=s["width"],
                               num_heads=s["heads"], mlp_dim=4 * s["width"], max_len=512,
                               vocab_size=VOCAB[kind], dropout_rate=0.0,
                               attention_dropout_rate=0.0, dtype=dtype)
        c.data.max_predictions = PREDICTIONS
    c.data.seq_len = s["seq"]
    c.train.batch_size = s["batch"]
    if loss_chunk is not None:
        c.train.loss_chunk = loss_chunk
    c.optim.update(lr=1e-4, warmup_steps=0, weight_decay=0.01, grad_clip=0.0)
    return c


def _load(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_file(name: str, variant: str) -> ConfigDict:
    return _load(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
                 ).get_config(variant)


def our_step(kind: str, dtype: str, steps_per_call: int = 1, accum: int | None = None,
             **model_opts):
    """A no-argument function running our real jitted train step once, on one device
    (`accum`: optim.grad_accum_steps; None = the config's)."""
    config = our_config(kind, dtype, **model_opts)
    if accum is not None:
        config.optim.grad_accum_steps = accum
    return step_on_one_device(config, SHAPE["batch"], steps_per_call)


def random_batch(objective, config: ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
    """The objective's batch of `batch_size` rows of `config.data.seq_len` random tokens
    (MLM: `data.max_predictions` real predictions per row, random NSP labels)."""
    vocab, seq = config.model.vocab_size, config.data.seq_len
    rng = np.random.default_rng(0)
    batch = objective.dummy_batch(batch_size)
    for key in ("inputs", "targets", "input_ids"):
        if key in batch:
            batch[key] = rng.integers(5, vocab, batch[key].shape).astype(np.int32)
    if "masked_positions" in batch:
        predictions = batch["masked_positions"].shape[1]
        batch["masked_positions"] = np.sort(np.stack([
            rng.choice(np.arange(1, seq), predictions, replace=False)
            for _ in range(batch_size)]), axis=1).astype(np.int32)
        batch["masked_ids"] = rng.integers(5, vocab, batch["masked_ids"].shape, dtype=np.int32)
        batch["masked_weights"] = np.ones_like(batch["masked_weights"])
        batch["nsp_label"] = rng.integers(0, 2, batch["nsp_label"].shape, dtype=np.int32)
    return batch


def step_on_one_device(config: ConfigDict, batch_size: int, steps_per_call: int = 1):
    """A no-argument function running `steps_per_call` optimizer steps of `config`'s real
    jitted train step (one compiled call) on one device, on a fixed random batch of
    `config.data.seq_len` tokens (MLM: `data.max_predictions` real predictions per row)."""
    objective = get_objective(config)
    model_cfg = to_model_config(config.model)
    model = objective.build_model(model_cfg)
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    tx, lr = optim.build(config.optim, 1000)
    state_sharding, init_state = train.make_state_init(
        config, objective, model, tx, mesh, sharding.get_rules("dp"))
    setup = train.Setup(objective, model, model_cfg, None, mesh, tx, lr, state_sharding,
                        init_state)
    step = train.make_train_step(setup, config.optim.grad_accum_steps, steps_per_call)
    batch = sharding.shard_batch(random_batch(objective, config, batch_size), mesh)
    batches = batch if steps_per_call == 1 else (batch,) * steps_per_call
    holder = {"state": init_state()}

    def run():
        holder["state"], metrics = step(holder["state"], batches)
        return metrics

    jax.block_until_ready(run())
    return lambda: jax.block_until_ready(run())


def our_eval(kind: str, dtype: str, batch_size: int):
    """A no-argument function running our jitted validation forward (the objective's
    eval metrics: loss sums and accuracy) once on `batch_size` random rows."""
    import flax.linen as nn

    config = our_config(kind, dtype)
    objective = get_objective(config)
    model = objective.build_model(to_model_config(config.model))
    batch = jax.device_put(random_batch(objective, config, batch_size))
    params = nn.unbox(objective.init(model, jax.random.key(0), batch))["params"]
    metrics = jax.jit(lambda p, b: objective.metrics(model, p, b, None, train=False))
    jax.block_until_ready(metrics(params, batch))
    return lambda: jax.block_until_ready(metrics(params, batch))


# ------------------------------------------------------------------------- HF
def hf_eval(kind: str, batch_size: int):
    """The peer's validation forward (char only): logits and summed cross-entropy."""
    if kind != "char":
        raise SystemExit("--eval: the peer side exists for --model char only (add --no_hf)")
    import torch
    from torch.nn import functional as F

    peer = _load(os.path.join(os.path.dirname(__file__), "char_lm_peer.py"))
    torch.manual_seed(0)
    model = peer.build_model(VOCAB["char"]).eval()
    x = torch.randint(0, VOCAB["char"], (batch_size, SHAPE["seq"]))
    y = torch.randint(0, VOCAB["char"], (batch_size, SHAPE["seq"]))

    @torch.no_grad()
    def run():
        F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()

    run()
    return run


def hf_step(kind: str):
    import torch
    import transformers as tr

    torch.manual_seed(0)
    s = SHAPE
    if kind == "char":
        return _char_peer_step()
    if kind == "gpt":
        cfg = tr.GPT2Config(n_layer=s["layers"], n_embd=s["width"], n_head=s["heads"],
                            n_positions=s["seq"], vocab_size=VOCAB[kind], resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        model = tr.GPT2LMHeadModel(cfg)
        ids = torch.randint(5, VOCAB[kind], (s["batch"], s["seq"]))

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss
    else:
        cfg = tr.BertConfig(num_hidden_layers=s["layers"], hidden_size=s["width"],
                            num_attention_heads=s["heads"], intermediate_size=4 * s["width"],
                            vocab_size=VOCAB[kind], hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        model = tr.BertForPreTraining(cfg)
        ids = torch.randint(5, VOCAB[kind], (s["batch"], s["seq"]))
        labels = torch.full_like(ids, -100)
        rows = torch.arange(s["batch"])[:, None]
        cols = torch.stack([torch.randperm(s["seq"] - 1)[:PREDICTIONS] + 1
                            for _ in range(s["batch"])])
        labels[rows, cols] = ids[rows, cols]
        nsp = torch.randint(0, 2, (s["batch"],))

        def loss_fn():
            return model(input_ids=ids, labels=labels, next_sentence_label=nsp).loss
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()

    run()
    return run


def _char_peer_step():
    """One step of benchmarks/char_lm_peer.py's training loop, on a fixed random batch."""
    import torch

    peer = _load(os.path.join(os.path.dirname(__file__), "char_lm_peer.py"))
    model = peer.build_model(VOCAB["char"])
    opt = peer.build_optimizer(model)
    x = torch.randint(0, VOCAB["char"], (SHAPE["batch"], SHAPE["seq"]))
    y = torch.randint(0, VOCAB["char"], (SHAPE["batch"], SHAPE["seq"]))

    def run():
        peer.train_step(model, opt, x, y)

    run()
    return run


def timed(fn, steps: int) -> tuple[float, float, float]:
    """(wall seconds, this process's CPU seconds, minor page faults) per call. On a shared
    machine the CPU time is the steadier figure: time spent descheduled does not count.
    Page faults show buffers mapped afresh at every call (`lm.runtime`)."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return ((time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps,
            faults / steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["gpt", "bert", "char"], default="gpt")
    p.add_argument("--dtype", default="float32", help="our compute dtype (HF stays fp32)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no_hf", action="store_true")
    p.add_argument("--only", choices=["lm", "hf"], default=None, help="time one side only")
    p.add_argument("--in_process", dest="isolate", action="store_false",
                   help="time both sides in this process; by default each round runs each "
                        "side in a fresh process (A B A B), because the two runtimes' thread "
                        "pools in one process disturb each other's timing")
    p.add_argument("--preset", default="", help="a model preset instead of the 4x256 shape")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--attention_impl", default="einsum", help="einsum | xla | cudnn")
    p.add_argument("--remat", default="none")
    p.add_argument("--scan", action="store_true")
    p.add_argument("--steps_per_call", type=int, default=1,
                   help="our optimizer steps per compiled call (train.steps_per_call)")
    p.add_argument("--accum", type=int, default=None,
                   help="our micro-batches per step (optim.grad_accum_steps; default: the "
                        "config's)")
    p.add_argument("--eval", action="store_true",
                   help="time the validation forward (no gradient) instead of the step")
    p.add_argument("--loss_chunk", type=int, default=None,
                   help="tokens per fused projection + loss chunk (default: the config's); "
                        "-1 = materialised logits")
    args = p.parse_args()
    if args.isolate and not args.only and not args.no_hf:
        return isolated(args)
    xla_flag = runtime.set_compute_dtype(args.dtype)  # as lm.main does, before JAX starts
    if args.model == "char":
        SHAPE.update(CHAR_SHAPE)
    SHAPE.update({k: v for k, v in (("seq", args.seq), ("batch", args.batch)) if v})
    sides = [args.only] if args.only else ["lm"] + ([] if args.no_hf else ["hf"])
    if "hf" in sides:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores `taskset` allows
    tokens = SHAPE["batch"] * SHAPE["seq"]
    n = 8192 if jax.devices()[0].platform == "gpu" else 2048
    ceiling = {d: gemm_ceiling(d, n) for d in ("float32", args.dtype)}
    print(json.dumps({"what": "gemm_ceiling", "device": jax.devices()[0].device_kind,
                      "gflops_per_s": {k: round(v, 1) for k, v in ceiling.items()}}), flush=True)
    peak = reporting.device_peak_flops(jax.devices()[0], args.dtype)
    config = our_config(args.model, args.dtype, args.preset)
    flops_per_token = get_objective(config).flops_per_token(to_model_config(config.model))
    fns = {}
    if args.eval:
        flops_per_token /= 3  # the forward of a (forward + backward) step's 3 passes
        fns = {side: our_eval(args.model, args.dtype, SHAPE["batch"]) if side == "lm" else
               hf_eval(args.model, SHAPE["batch"]) for side in sides}
    elif "lm" in sides:
        fns["lm"] = our_step(args.model, args.dtype, preset=args.preset,
                             attention_impl=args.attention_impl, remat=args.remat,
                             scan=args.scan, loss_chunk=args.loss_chunk,
                             steps_per_call=args.steps_per_call, accum=args.accum)
    if "hf" in sides and not args.eval:
        fns["hf"] = hf_step(args.model)
    times: dict[str, list[float]] = {"lm": [], "hf": []}
    cpu_times: dict[str, list[float]] = {"lm": [], "hf": []}
    what = f"{'eval' if args.eval else 'train_step'}_{args.model}"
    for r in range(args.rounds):
        for impl, fn in fns.items():
            k = args.steps_per_call if impl == "lm" and not args.eval else 1
            t, cpu, faults = (x / k for x in timed(fn, max(1, args.steps // k)))  # per step
            times[impl].append(t)
            cpu_times[impl].append(cpu)
            gflops = flops_per_token * tokens / t / 1e9
            dtype = args.dtype if impl == "lm" else "float32"
            print(json.dumps({
                "what": what, "impl": impl, "round": r, "dtype": dtype,
                "config": SHAPE | {"vocab": VOCAB[args.model], "preset": args.preset,
                               "attention": args.attention_impl, "remat": args.remat,
                               "loss_chunk": args.loss_chunk, "accum": args.accum,
                               "steps_per_call": k, "eval": args.eval},
                "step_time_s": round(t, 4), "step_cpu_s": round(cpu, 4),
                "page_faults_per_step": round(faults), "tokens_per_sec": round(tokens / t, 1),
                "model_gflops_per_s": round(gflops, 1),
                "mfu_vs_gemm_ceiling": round(gflops / ceiling[dtype], 3),
                **({"mfu_vs_device_peak": round(gflops * 1e9 / peak, 3)}
                   if peak and impl == "lm" else {}),
                "peak_rss_mb": round(peak_rss_mb(), 1), "cpu_flags": cpu_flags(),
                **({"cpu_bf16_units": runtime.cpu_has_bf16_units()} if dtype == "bfloat16"
                   and jax.default_backend() == "cpu" else {}),
                **({"xla_flag": xla_flag} if impl == "lm" and xla_flag else {})}), flush=True)
    print_ratio(args, times, cpu_times)


def print_ratio(args, times: dict[str, list[float]], cpu_times: dict[str, list[float]]
                ) -> None:
    """Median wall-time ratio (and the CPU-time one, steadier on a shared machine)."""
    if times["hf"] and times["lm"]:
        ratio = float(np.median(times["hf"]) / np.median(times["lm"]))
        cpu = float(np.median(cpu_times["hf"]) / np.median(cpu_times["lm"]))
        print(json.dumps({"what": f"ratio_{'eval_' if args.eval else ''}{args.model}",
                          "dtype": args.dtype,
                          "isolated": args.isolate, "rounds": len(times["lm"]),
                          "steps_per_call": args.steps_per_call,
                          "lm_over_hf_tokens_per_sec": round(ratio, 2),
                          "lm_over_hf_by_cpu_time": round(cpu, 2),
                          "load_average": os.getloadavg()[0], "cpu_flags": cpu_flags()}),
              flush=True)


def isolated(args) -> None:
    """Rounds of (ours in a fresh process, then the peer in a fresh process)."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode import side_records

    argv = [*sys.argv[1:], "--rounds", "1"]  # the last --rounds wins
    times: dict[str, list[float]] = {"lm": [], "hf": []}
    cpu_times: dict[str, list[float]] = {"lm": [], "hf": []}
    for r in range(args.rounds):
        for impl in ["lm"] + ([] if args.no_hf else ["hf"]):
            for record in side_records([sys.executable, __file__, *argv, "--only", impl],
                                       impl, r):
                record["process"] = impl
                if record["what"].startswith(("train_step_", "eval_")):
                    times[impl].append(record["step_time_s"])
                    cpu_times[impl].append(record["step_cpu_s"])
                print(json.dumps(record), flush=True)  # incl. each process's GEMM ceiling
    print_ratio(args, times, cpu_times)


if __name__ == "__main__":
    main()
