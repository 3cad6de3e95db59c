"""Quality evaluation: ``mspeckv eval {ppl,kl,attention,ece,needle,ruler,recon,gsm8k,accept,speed,all,report}``.

Every number is measured from the model's outputs through the real placed or compressed cache, next to the full-cache
baseline run in the same invocation. Layout:

- ``runner``: ``EvalConfig`` (its fields are the CLI flags), the one registry of metric families, ``run_eval``;
- ``mspeckv.runs.template`` (the run layer, shared with the benches): flags from dataclass fields, resumable
  per-cell JSONs (``CellStore``);
- ``variants``: what a variant is (press and/or placement) and every call into the press/cache API;
- ``lm`` (ppl, kl, ece, attention), ``recon``, ``speed``, ``retrieval`` (needle, ruler), ``gsm8k``, ``accept``:
  one module per metric family, each documenting its protocol;
- ``metrics``: the arithmetic (KL, ECE, PPL, cosine, relative MSE); ``synth``: seeded needle/RULER prompts;
  ``generation``: greedy decoding through a compressed cache; ``report`` and ``plots``: summaries and PNGs;
- ``intervals``: the 95% intervals (paired bootstrap on PPL Δ, Wilson on needles) and the verdict an interval gives;
  ``goals``: the context-sensitivity check (the floor) and the goal lines, judged from those intervals.
"""
