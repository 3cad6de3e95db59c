"""Quality evaluation: ``mspeckv eval {ppl,kl,attention,ece,needle,ruler,recon,gsm8k,accept,speed,all,report}``.

Every number is measured from the model's outputs through the real placed or compressed cache, next to the full-cache
baseline run in the same invocation. ``runner``: ``EvalConfig`` (the CLI flags), the registry of metric families and
``run_eval``, on the run layer's template and resumable cells (``mspeckv.runs.template``); ``variants``: what a
variant is and every call into the press/cache API; one module per metric family (``lm``, ``recon``, ``speed``,
``retrieval``, ``gsm8k``, ``accept``), each documenting its protocol; ``metrics`` and ``intervals``: the arithmetic
and the 95% intervals; ``goals``: the context floor and the goal lines; ``report`` and ``plots``: the summaries.
"""
