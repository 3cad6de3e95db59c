"""Property test over the CLI's argument space: whatever the mix of valid and invalid values, a command either
succeeds or exits 2 with one line on stderr; it never shows a traceback and never leaves a partial file."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mspeckv import cli  # noqa: E402
from tests.test_sweeps import tiny_dirs  # noqa: E402, F401  (fixture)

GENERATE = {
    "--max-new-tokens": ["1", "3", "0", "-1", "600"],
    "--prefill-chunk": ["4", "0"],
    "--temperature": ["0", "0.7", "nan", "-1", "inf"],
    "--top-p": ["1", "0.9", "0", "1.5", "nan"],
    "--top-k": ["0", "5", "-1"],
    "--seed": ["0", "3", "-2"],
    "--on-chip": ["0", "1", "3", "9", "-1"],
    "--kv-quant": ["none", "int8", "int4"],
    "--kv-group-size": ["8", "0", "7"],
    "--resident-layers": ["0", "1", "5"],
    "--resident-policy": ["lru", "static"],
    "--drafter": ["model", "ngram"],
    "--gamma": ["2", "0"],
    "--draft-gamma": ["1", "0"],
    "--budget": ["16", "12", "0"],
    "--chunk": ["4", "8"],
}
DECODE = {
    "--prompt-len": ["16", "0", "5000"],
    "--gen-len": ["3", "1", "0"],
    "--repeats": ["2", "1", "0"],
    "--batch": ["1", "2", "0"],
    "--prefill-chunk": ["8", "0"],
    "--on-chip": ["2"],
    "--gamma": ["2"],
}
PLAN = {
    "--context": ["100", "0", "-5", "1000000"],
    "--gpu-kv-budget": ["0.001", "1", "0", "nan", "-1", "inf"],
    "--batch": ["1", "0"],
    "--kv-group-size": ["64", "0"],
}


def _flags(table: dict[str, list[str]]):
    return st.dictionaries(st.sampled_from(sorted(table)), st.none(), max_size=5).flatmap(
        lambda keys: st.fixed_dictionaries({k: st.sampled_from(table[k]) for k in keys}))


@st.composite
def argv(draw, target: str, draft: str, files: dict[str, str]):
    cmd = draw(st.sampled_from(["generate", "bench", "plan"]))
    if cmd == "plan":
        flags = draw(_flags(PLAN))
        flags.setdefault("--context", "100")
        flags.setdefault("--gpu-kv-budget", "0.001")
        return ["plan", "--model", "random:tiny", *(t for kv in flags.items() for t in kv)]
    if cmd == "bench":
        flags = draw(_flags(DECODE))
        out = draw(st.sampled_from([files["out"], files["folder"], files["in_file"]]))
        return ["bench", "decode", "--model", "random:tiny", "--device", "cpu", "--out", out,
                *(t for kv in flags.items() for t in kv)]
    flags = draw(_flags(GENERATE))
    mode = draw(st.sampled_from(["ar", "vanilla", "mspeckv", "fast"]))
    prompt = draw(st.sampled_from([["--prompt", "hello world"], ["--prompt", ""], ["--prompt-file", files["text"]],
                                   ["--prompt-file", files["folder"]], ["--prompt-file", files["binary"]]]))
    args = ["generate", "--model", target, "--device", "cpu", "--mode", mode, *prompt]
    if mode in ("vanilla", "mspeckv") and flags.get("--drafter", "model") == "model":
        args += ["--draft", draft]
    return args + [t for kv in flags.items() for t in kv]


def test_cli_never_shows_a_traceback(tiny_dirs, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MSPECKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (tmp_path / "prompt.txt").write_text("the quick brown fox")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    files = {"text": str(tmp_path / "prompt.txt"), "binary": str(tmp_path / "binary.txt"), "folder": str(out_dir),
             "out": str(out_dir / "decode.json"), "in_file": str(tmp_path / "binary.txt" / "x.json")}

    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(argv(tiny_dirs[0], tiny_dirs[1], files))
    def check(args):
        capsys.readouterr()
        for p in out_dir.iterdir():
            p.unlink()
        try:
            rc = cli.main(args)
        except SystemExit as e:  # argparse usage errors
            rc = e.code
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert rc in (0, 2), (args, rc, err)
        if rc == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("mspeckv"), (args, err)
            assert not any(out_dir.iterdir()), args  # a refused command writes nothing
        assert not [p for p in out_dir.iterdir() if p.name.startswith(".") or p.suffix in (".tmp", ".partial")]

    check()


def _leaf_commands(parser, prefix=()):
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix
        return
    for name, p in subs[0].choices.items():
        yield from _leaf_commands(p, (*prefix, name))


def test_every_command_renders_its_help(capsys):
    """``--help`` of every (sub)command formats: help strings from config fields pass through argparse's %-format."""
    from mspeckv.cli import build_parser

    leaves = list(_leaf_commands(build_parser()))
    assert ("eval",) in leaves and ("bench", "placement") in leaves
    for cmd in leaves:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*cmd, "--help"])
        assert e.value.code == 0, cmd
        assert "usage:" in capsys.readouterr().out
