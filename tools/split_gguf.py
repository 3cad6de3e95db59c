"""Split an embedded model's assembled GGUF into parts under .carry/ (git-ignored) for the GPU machine, whose calls
carry at most 64 MiB each, the working tree included: keep part + tracked files under that (default 50 MB parts:
the tracked tree is about 14 MB).
Usage: python tools/split_gguf.py qwen2.5-coder-1.5b q15 [MB]"""

import sys
from pathlib import Path

from mspeckv.model.loading import assemble

name, tag = sys.argv[1], sys.argv[2]
data = assemble(name, Path(f"/tmp/{tag}.gguf")).read_bytes()
Path(".carry").mkdir(exist_ok=True)
n = int(float(sys.argv[3]) * 1e6) if len(sys.argv) > 3 else 50_000_000
for old in Path(".carry").glob(f"{tag}.[0-9][0-9]"):
    old.unlink()
for i in range(0, len(data), n):
    Path(f".carry/{tag}.{i // n:02d}").write_bytes(data[i:i + n])
print(f"{name}: {(len(data) + n - 1) // n} parts in .carry/")
