"""What the CLI front-ends share (``cli.py``, ``hf/cli.py``, ``parallel/cli.py``, ``cli_presses.py``): the flags of a
generation, each declaring where it acts; the configs built from them; the checks that run before any weights load;
prompt encoding; and one generation in a given mode.

Where a flag acts is declared on the flag (``add(..., applies={fact: values})``): the facts are this run's mode,
backend, drafter, tensor-parallel degree, decoding (greedy or sampled), whether any layer is offloaded and whether any
is resident. :func:`check_flags` refuses a flag given where it would be ignored, from those declarations alone
(``validate.ignored``). Library modules never import this one; it imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse

from . import cli_checks as checks
from . import validate as v

SPEC_MODES = ("vanilla", "mspeckv", "self")  # self: speculation at batch only (generate --prompts)
MODES = ("ar", *SPEC_MODES)
BACKENDS = ("ours", "hf")
OFFLOADED = {"kv": ("offloaded",)}


# ---------------------------------------------------------------------------------------------- declared flags
def add(parser, *names: str, applies: dict[str, tuple] | None = None, **kw) -> argparse.Action:
    """``parser.add_argument(*names, **kw)``, and where the flag acts: ``applies`` maps a fact (see
    :func:`facts`) to the values under which the flag is read (None: everywhere)."""
    act = parser.add_argument(*names, **kw)
    act.applies = applies or {}
    return act


def record_applies(parser: argparse.ArgumentParser) -> None:
    """Store each (sub)command's declarations in its namespace (``_applies``: dest -> {fact: values}), so
    :func:`check_flags` reads the declarations of the command that runs."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.set_defaults(_applies={a.dest: a.applies for a in parser._actions if getattr(a, "applies", None)})
    for s in subs:
        for p in s.choices.values():
            record_applies(p)


def facts(a, n_layers: int | None = None) -> dict:
    """This run's value of every fact a flag can depend on (``n_layers``: the model's, once its config is read)."""
    greedy = getattr(a, "greedy", False)
    offloaded = a.on_chip is not None and (n_layers is None or a.on_chip < n_layers)
    return {"mode": a.mode, "backend": getattr(a, "backend", "ours"), "drafter": a.drafter,
            "tp": 1 if getattr(a, "tp", 1) == 1 else "N", "greedy": greedy,
            "decoding": "greedy" if greedy or getattr(a, "temperature", 0) == 0 else "sampled",
            "kv": "offloaded" if offloaded else "device", "resident": "some" if a.resident_layers else "none"}


def say(a, n_layers: int | None = None):
    """``say(fact, value)``: a fact of this run in the user's words (for the messages of ``validate.ignored``)."""
    def words(fact: str, value) -> str:
        if fact == "kv" and value == "device":
            if a.on_chip is None:
                return "every layer's KV stays on the GPU without --on-chip"
            return f"with --on-chip {a.on_chip} of {n_layers} layers every layer's KV stays on the GPU"
        return {("tp", 1): "--tp 1", ("tp", "N"): f"--tp {getattr(a, 'tp', 1)} does not support it (each rank holds "
                                                  f"a share of every layer's KV heads)",
                ("greedy", True): "--greedy sets the temperature to 0", ("greedy", False): "no --greedy",
                ("decoding", "greedy"): "decoding is greedy (temperature 0)",
                ("decoding", "sampled"): "sampling (--temperature > 0)",
                ("kv", "offloaded"): "offloaded layers (--on-chip N, fewer than the model's layers)",
                ("resident", "none"): "--resident-layers is 0",
                ("resident", "some"): "resident layers (--resident-layers N > 0)"}.get((fact, value),
                                                                                      f"--{fact} {value}")
    return words


def given(a) -> dict[str, str]:
    """dest -> flag, for the declared flags of the running command given a value other than its default."""
    return {d: checks.flag(d) for d in getattr(a, "_applies", {}) if checks.changed(a, d)}


def check_flags(a, n_layers: int | None = None) -> None:
    """Refuse every flag given where its declaration says it would be ignored."""
    v.ignored(given(a), getattr(a, "_applies", {}), facts(a, n_layers), say(a, n_layers))


def check_action_flags(a, command: str) -> None:
    """Refuse the flags of ``command`` declared for other actions than ``a.action`` (``applies={"action": ...}``)."""
    v.ignored(given(a), getattr(a, "_applies", {}), {"action": a.action}, lambda fact, x: f"{command} {x}")


def add_sampling(p) -> None:
    sampled = {"decoding": ("sampled",)}
    add(p, "--temperature", type=float, default=0.0, help="0 = greedy (default)", applies={"greedy": (False,)})
    add(p, "--top-p", type=float, default=1.0, applies=sampled)
    add(p, "--top-k", type=int, default=0, applies=sampled)
    add(p, "--seed", type=int, default=0, applies=sampled)
    p.add_argument("--greedy", action="store_true", help="force temperature 0")


def add_placement(p) -> None:
    g = p.add_argument_group("KV placement")
    resident = {**OFFLOADED, "resident": ("some",)}
    add(g, "--on-chip", type=int, default=None, help="layers whose KV stays on the GPU (default: all)")
    add(g, "--kv-quant", default="none", choices=["none", "int8", "int4", "int2"], applies=OFFLOADED)
    add(g, "--allow-lossy", action="store_true", help="run --kv-quant int2, which is refused without it (it changes "
        "the output a lot: the refusal names the cost measured for the model)", applies=OFFLOADED)
    add(g, "--kv-group-size", type=int, default=64, applies=OFFLOADED)
    add(g, "--resident-layers", type=int, default=0, applies=OFFLOADED)
    add(g, "--resident-format", default="dequant", choices=["dequant", "quant"], applies=resident)
    add(g, "--resident-policy", default="lru", choices=["lru", "static"], applies=resident)
    add(g, "--press", default=None, help="compress the KV after prefill: name:k=v,... | preset | FILE.yaml "
        "(lossy: see `mspeckv presses list`)", applies={"tp": (1,)})
    add(g, "--press-every", type=int, default=None, help="re-press every N decoded tokens (--mode ar, --backend ours)",
        applies={"mode": ("ar",), "backend": ("ours",), "tp": (1,)})


def add_spec(p, budget: int = 4096, gamma: int = 8, mode: str = "ar") -> None:
    g = p.add_argument_group("speculation")
    spec, hier = {"mode": SPEC_MODES}, {"mode": ("mspeckv",)}
    add(g, "--mode", default=mode, choices=list(MODES))
    add(g, "--draft", default="qwen2.5-coder-0.5b", applies={**spec, "drafter": ("model",)})
    add(g, "--drafter", default="model", choices=["model", "ngram"], help="ngram: prompt lookup, no draft",
        applies=spec)
    add(g, "--gamma", type=int, default=gamma, help="proposals per full-KV verification (level 2)", applies=spec)
    add(g, "--draft-gamma", type=int, default=4, help="proposals per retrieval verification (level 1)", applies=hier)
    add(g, "--budget", type=int, default=budget, help="retrieval cache: retrieved prompt tokens", applies=hier)
    add(g, "--chunk", type=int, default=8, help="retrieval chunk size (budget must be a multiple)", applies=hier)
    add(g, "--draft-sinks", type=int, default=16, applies={**hier, "drafter": ("model",)})
    add(g, "--draft-window", type=int, default=None, help="default 256 - sinks - gamma",
        applies={**hier, "drafter": ("model",)})
    add(g, "--refresh-every", type=int, default=None, help="rebuild retrieval every N tokens", applies=hier)
    batch = {"mode": ("vanilla", "self")}
    windowed = {"mode": ("self", "mspeckv")}
    add(g, "--self-window", type=int, default=256, help="--mode self, and mspeckv with --prompts: the newest rows "
        "each step of the target over its window reads", applies=windowed)
    add(g, "--self-sinks", type=int, default=4, help="--mode self, and mspeckv with --prompts: the first rows each "
        "windowed step reads", applies=windowed)
    add(g, "--auto-gamma", action="store_true", help="--prompts: the cost model picks γ <= --gamma, or AR, per "
        "round from steps timed on the running batch", applies=batch)
    add(g, "--l1-press", default=None, help="the middle level's press (lossless: the full KV verifies); default "
        "retrieval:budget=BUDGET,chunk=CHUNK", applies={**hier, "tp": (1,)})


# ---------------------------------------------------------------------------------------------- configs from flags
def sampling(a):
    from .config import SamplingConfig

    temperature = 0.0 if getattr(a, "greedy", False) else a.temperature
    return SamplingConfig(temperature=temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)


def placement(a):
    from .kv.placement import Placement
    from .presses import parse_press

    parse_press(getattr(a, "press", None))  # a bad --press fails before any model loads
    if getattr(a, "press_every", None) is not None and (a.press is None or a.press_every < 1):
        raise ValueError("--press-every N needs --press and N >= 1")
    return Placement(on_chip=a.on_chip, kv_quant=a.kv_quant, kv_group_size=a.kv_group_size,
                     resident_layers=a.resident_layers, resident_format=a.resident_format,
                     resident_policy=a.resident_policy)


def spec(a):
    from .decoding.speculative import SpecConfig

    return SpecConfig(mode=a.mode, gamma=a.gamma, draft_gamma=a.draft_gamma, budget=a.budget, chunk=a.chunk,
                      draft_sinks=a.draft_sinks, draft_window=a.draft_window, refresh_every=a.refresh_every,
                      drafter=a.drafter, l1_press=a.l1_press)


def encode(tok, text: str, chat: bool) -> list[int]:
    """The prompt's token ids (in the model's chat template with ``chat``); refuses a prompt of no tokens."""
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    else:
        ids = tok(text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError("the prompt encodes to 0 tokens; give some text")
    return ids


# ---------------------------------------------------------------------------------------------- before any weights
def model_and_placement(a):
    """The placement and the device, checked against the flags alone, then against the model's config (no weights
    load): (ModelConfig, Placement)."""
    from .evals.lossy import check_lossy
    from .model.api import parse_device

    p = placement(a)
    check_flags(a)
    check_lossy(a.kv_quant, a.model, getattr(a, "allow_lossy", False))  # --kv-quant int2 needs --allow-lossy
    parse_device(a.device)
    cfg = checks.model_config(a.model)
    p.validate(cfg.n_layers, cfg.head_dim)
    check_flags(a, cfg.n_layers)
    return cfg, p


def preflight(a):
    """What can be checked before the weights load: the flags alone, then against the models' configs. Returns the
    target's ModelConfig."""
    from .config import GenerationConfig

    if getattr(a, "backend", "ours") == "hf" and a.mode != "ar":
        raise ValueError("--backend hf runs transformers' own generate: use --mode ar (speculative modes run on "
                         "--backend ours)")
    GenerationConfig(max_new_tokens=a.max_new_tokens, sampling=sampling(a), prefill_chunk=a.prefill_chunk)
    if a.mode != "ar":
        spec(a)
    cfg, _ = model_and_placement(a)
    checks.generation_fits(cfg, a.max_new_tokens)
    if getattr(a, "backend", "ours") == "hf" and a.press is not None:
        from .presses import parse_press

        if parse_press(a.press).observers(cfg.n_layers):
            raise ValueError(f"--press {a.press} watches the attention queries or weights, which transformers does "
                             f"not pass to a cache; with --backend hf use a press that needs no observation (e.g. "
                             f"streaming, kivi without guard), or drop --backend hf")
    if a.mode != "ar" and a.drafter == "model":
        dcfg = checks.model_config(a.draft)
        if dcfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"--draft {a.draft} has a vocabulary of {dcfg.vocab_size}, the model {a.model} one of "
                             f"{cfg.vocab_size}; pick a draft from the same model family")
    return cfg


# ---------------------------------------------------------------------------------------------- one generation
def progress_prefill(total: int, label: str = "prefill"):
    """A rich progress callback for long prefills (None for short ones), and the bar to stop."""
    if total < 4096:
        return None, None
    from rich.progress import Progress

    p = Progress(transient=True)
    task = p.add_task(label, total=total)
    p.start()
    return (lambda done, tot: p.update(task, completed=done)), p


def run_generation(a, model, tok, draft, ids: list[int], mode: str):
    """One generation in the given mode -> GenerationResult (or SpecResult)."""
    import torch

    from .cache import make_cache
    from .config import GenerationConfig
    from .decoding.autoregressive import generate

    gen = GenerationConfig(max_new_tokens=a.max_new_tokens, sampling=sampling(a), prefill_chunk=a.prefill_chunk)
    p = placement(a)
    model.check_context(len(ids) + gen.max_new_tokens)
    cb, bar = progress_prefill(len(ids), f"prefill ({mode})")
    try:
        if mode == "ar":
            cache = make_cache(model, p, 1, len(ids) + gen.max_new_tokens, press=a.press, compress_every=a.press_every)
            return generate(model, torch.tensor([ids]), gen, cache=cache, progress=cb)
        from .decoding.speculative import speculative_generate

        a.mode = mode
        return speculative_generate(model, draft, torch.tensor([ids]), gen, spec(a), placement=p, press=a.press,
                                    progress=cb)
    finally:
        if bar is not None:
            bar.stop()
