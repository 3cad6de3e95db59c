"""Repro for the H200 crash of `mspeckv eval accept` (CUDA illegal memory access with snapkv:budget=4096 as the
MSpecKV middle level, 8064-token prompt, 128 greedy tokens), at the real 1.5B shape with random weights.

    CUDA_LAUNCH_BLOCKING=1 python tools/gpu/repro_l1_press.py [press ...]
"""

import sys
import time

import torch

from mspeckv.config import GenerationConfig
from mspeckv.decoding.speculative import SpecConfig, speculative_generate
from mspeckv.model.api import random_model

presses = sys.argv[1:] or ["retrieval:budget=4096", "snapkv:budget=4096", "streaming:budget=4096"]
target = random_model("qwen2.5-1.5b", "cuda", seed=0)
draft = random_model("qwen2.5-1.5b", "cuda", seed=1)  # same shape: the crash concerns the target's middle level
base = torch.randint(0, 151936, (1, 1008), generator=torch.Generator().manual_seed(0))
ids = torch.cat([base] * 8, 1)  # 8064 tokens
gen = GenerationConfig(max_new_tokens=128, stop_on_eos=False, prefill_chunk=1024)
for p in presses:
    t0 = time.time()
    try:
        res = speculative_generate(target, draft, ids, gen, SpecConfig(gamma=8, draft_gamma=4, l1_press=p))
        torch.cuda.synchronize()
        print(f"{p}: ok in {time.time() - t0:.1f} s, levels {res.levels}", flush=True)
    except Exception as e:
        print(f"{p}: {type(e).__name__}: {e}", flush=True)
        raise
