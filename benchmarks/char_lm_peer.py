"""The `char_lm:baby` run as a PyTorch-eager peer would do it (nanoGPT's documented CPU
run: 4 layers, 4 heads, width 128, block 64, batch 12, no biases, dropout 0, AdamW 1e-3
cosine to 1e-4 with 100 warmup steps, betas (0.9, 0.99), weight decay 0.1 on 2-D weights,
clip 1.0, 2000 steps, first 90 % of the characters train / last 10 % validation), trained
in this process and evaluated exactly as our runs are (every non-overlapping 64-character
window of the validation split). It answers two questions on this machine: which
validation loss this recipe reaches here, and how long the peer takes to get there.

Prints one JSON line per evaluation and a final summary line:

    python benchmarks/char_lm_peer.py --data ../shared/data/tinyshakespeare/input.txt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

BLOCK, BATCH, LAYERS, HEADS, WIDTH = 64, 12, 4, 4, 128


def build_model(vocab: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(WIDTH, bias=False)
            self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
            self.proj = nn.Linear(WIDTH, WIDTH, bias=False)
            self.ln2 = nn.LayerNorm(WIDTH, bias=False)
            self.up = nn.Linear(WIDTH, 4 * WIDTH, bias=False)
            self.down = nn.Linear(4 * WIDTH, WIDTH, bias=False)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, HEADS, d // HEADS).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
            return x + self.down(F.gelu(self.up(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, WIDTH)
            self.pos = nn.Embedding(BLOCK, WIDTH)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.ln = nn.LayerNorm(WIDTH, bias=False)
            for name, p in self.named_parameters():
                if p.dim() == 2:  # residual projections scaled as GPT-2
                    std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith(
                        ("proj.weight", "down.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, ids):
            x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.ln(x) @ self.tok.weight.T  # tied output projection

    return GPT()


def build_optimizer(model):
    """AdamW (betas 0.9, 0.99) with weight decay 0.1 on the 2-D weights only, lr 1e-3."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))


def train_step(model, opt, x, y) -> None:
    """Cross-entropy, backward, global-norm clip at 1.0, optimizer step."""
    import torch
    from torch.nn import functional as F

    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/tinyshakespeare/input.txt")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    if not os.path.isfile(args.data):
        raise SystemExit(f"--data: no file {args.data} (tiny shakespeare, ../shared/data)")
    import torch
    from torch.nn import functional as F

    torch.manual_seed(args.seed)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores `taskset` allows
    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(ids))
    train, val = ids[:n], ids[n:]
    model = build_model(len(chars))
    opt = build_optimizer(model)

    def lr_at(step: int) -> float:  # step counts from 1, as ours logs it
        if step <= 100:
            return 1e-3 * step / 100
        ratio = (step - 100) / (args.steps - 100)
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    windows = (len(val) - 1) // BLOCK
    vx = val[:windows * BLOCK].view(windows, BLOCK)
    vy = val[1:windows * BLOCK + 1].view(windows, BLOCK)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = 0.0
        for i in range(0, windows, 256):
            logits = model(vx[i:i + 256])
            total += F.cross_entropy(logits.flatten(0, 1), vy[i:i + 256].flatten(),
                                     reduction="sum").item()
        model.train()
        return total / (windows * BLOCK)

    train_time, first_below = 0.0, None
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        ix = torch.randint(len(train) - BLOCK - 1, (BATCH,))
        x = torch.stack([train[i:i + BLOCK] for i in ix])
        y = torch.stack([train[i + 1:i + BLOCK + 1] for i in ix])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        train_step(model, opt, x, y)
        train_time += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = evaluate()
            if first_below is None and val_loss <= 1.88:
                first_below = (step, train_time)
            print(json.dumps({"what": "char_lm_baby_peer", "impl": "torch_eager",
                              "step": step, "val_loss": round(val_loss, 4),
                              "train_time_s": round(train_time, 1),
                              "tokens_per_sec": round(step * BATCH * BLOCK / train_time, 1)}),
                  flush=True)
    print(json.dumps({
        "what": "char_lm_baby_peer_summary", "impl": "torch_eager", "steps": args.steps,
        "final_val_loss": round(val_loss, 4), "train_time_s": round(train_time, 1),
        "step_time_ms": round(1e3 * train_time / args.steps, 2),
        "tokens_per_sec": round(args.steps * BATCH * BLOCK / train_time, 1),
        "reached_1.88_at": first_below and {"step": first_below[0],
                                            "train_time_s": round(first_below[1], 1)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}),
        flush=True)


if __name__ == "__main__":
    main()
