"""The run layer, the ground floor every bench and eval stands on (it imports neither):

- ``store``: atomic JSON/text writes (0644), run metadata with provenance asked of git, one rule for a folder of
  resumable cells (``CellFolder``: a cell is done iff its JSON reads back as ``ok``; damaged and foreign files are
  named), the benches' ``RunStore``/``run_sweep``;
- ``template``: a config dataclass -> CLI flags (``opt``, ``add_flags``, ``from_args``, ``check``), the evals'
  ``CellStore`` and per-item checkpoints;
- ``checks``: output locations, flags that would be ignored, generation length against a model's context;
- ``plots``: matplotlib imported lazily, figures written atomically; ``tables``: Markdown and CSV text.
"""
