#!/usr/bin/env bash
# GPU run used for the closing notes: cuDNN attention vs the einsum reference, then the
# GPT-2 small (124M) bf16 train step at seq 1024 and the attention sweep.
set -u
python3 - <<'PY'
import jax, jax.numpy as jnp, numpy as np
from lm.models import masks
from lm.models.attention import dot_product_attention
rng = np.random.default_rng(0)
for kv in (12, 4):
    q = jnp.asarray(rng.normal(size=(2, 1024, 12, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(2, 1024, kv, 64)), jnp.bfloat16)
    seg = jnp.array([[1] * 1024, [1] * 900 + [0] * 124])
    pos = jnp.broadcast_to(jnp.arange(1024), (2, 1024))
    m = masks.self_mask(seg, pos, causal=True).replace(packed=False)
    ref = dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), k.astype(jnp.float32), m)
    for impl in ("xla", "cudnn"):
        out = dot_product_attention(q, k, k, m, impl=impl).astype(jnp.float32)
        err = float(jnp.abs(out - ref)[1, :900].max()), float(jnp.abs(out - ref)[0].max())
        print({"check": "attention_vs_fp32_einsum", "impl": impl, "kv_heads": kv, "max_abs_err": err})
PY
for impl in cudnn xla; do
  python3 benchmarks/train_step.py --model gpt --preset gpt2_small --seq 1024 --batch 32 \
    --dtype bfloat16 --attention_impl $impl --no_hf --rounds 2 --steps 10
done
python3 benchmarks/train_step.py --model gpt --preset gpt2_small --seq 1024 --batch 64 \
  --dtype bfloat16 --attention_impl cudnn --no_hf --rounds 2 --steps 10 --remat dots_no_batch
python3 benchmarks/attention.py --dtype bfloat16 --batch 8 --heads 12 --impls einsum,xla,cudnn
