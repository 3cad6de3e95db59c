"""Split an embedded model's assembled GGUF into <=60 MB parts under .carry/ (git-ignored) for the GPU machine,
whose calls carry at most 64 MiB each. Usage: python tools/split_gguf.py qwen2.5-coder-1.5b q15"""

import sys
from pathlib import Path

from mspeckv.model.loading import assemble

name, tag = sys.argv[1], sys.argv[2]
data = assemble(name, Path(f"/tmp/{tag}.gguf")).read_bytes()
Path(".carry").mkdir(exist_ok=True)
n = 60_000_000
for i in range(0, len(data), n):
    Path(f".carry/{tag}.{i // n:02d}").write_bytes(data[i:i + n])
print(f"{name}: {(len(data) + n - 1) // n} parts in .carry/")
