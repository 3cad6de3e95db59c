"""kvpress presses and transformers' quantized caches on our PPL/KL protocol (``mspeckv/evals/peers.py``).

    python tools/peers.py --python /tmp/kvp/bin/python --model qwen2.5-coder-0.5b --context 2048 --windows 2 \\
        --dataset pycode --peers kvpress:snapkv:keep=0.25,window_size=32 kvpress:streaming:keep=0.25 \\
        --out-dir results/quality/peers-cpu

``--python`` is the interpreter of a virtual environment with kvpress (it pins transformers < 5.3), e.g.
``python -m venv --system-site-packages /tmp/kvp && /tmp/kvp/bin/pip install kvpress optimum-quanto hqq``.
Prints one line per peer, then writes ``OUT_DIR/peers.json`` (rows, config, versions of both environments).

    python tools/peers.py table PEERS_JSON [OUR_EVAL_DIR ...]

prints one Markdown table of the peers' rows and our eval folders' ppl/kl rows.
"""

import argparse
import json
import sys

from mspeckv.evals.peers import PeersConfig, our_rows, run_peers, table
from mspeckv.runs.template import add_flags, from_args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:
        if len(argv) < 2:
            print("peers: error: table needs PEERS_JSON [OUR_EVAL_DIR ...]", file=sys.stderr)
            return 2
        try:
            rows = json.loads(open(argv[1]).read())["rows"] + [r for d in argv[2:] for r in our_rows(d)]
        except (OSError, ValueError, KeyError) as e:
            print(f"peers: error: {argv[1]} is not a peers.json ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        print(table(rows))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_flags(p, PeersConfig)
    try:
        out = run_peers(from_args(PeersConfig, p.parse_args(argv)))
    except (ValueError, RuntimeError) as e:
        print(f"peers: error: {e}", file=sys.stderr)
        return 2
    for r in out["rows"]:
        what = (f"PPL {r['ppl']:.3f} ({r['ppl_delta_pct']:+.2f}%)  KL {r['kl_mean']:.4f}  "
                f"top-1 {r['top1_agreement']:.3f}" if r["status"] == "ok" else f"error: {r['error']}")
        print(f"{r['peer']:48s} {what}")
    print(json.dumps({"rows": len(out["rows"]), "out": out["config"]["out_dir"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
