"""Run a function on N tensor-parallel ranks: under ``torchrun``, or by spawning the ranks here.

    launch(fn, world, args, device_type) -> rank 0's return value

- **torchrun** (``torchrun --nproc-per-node N -m mspeckv generate --tp N ...``): this process is one rank; the
  process group is initialised from torchrun's environment (``env://``) and ``fn`` runs here. torchrun's agent
  handles a failed rank (it stops the others).
- **spawned** (``mspeckv generate --tp N ...``): N processes are started with the ``spawn`` method (fresh
  interpreters: CUDA cannot be forked), rank i on ``cuda:i`` with NCCL, or on the CPU with gloo, rendezvous over
  TCP on a free local port. Rank 0's return value comes back through a pickle file. When any rank raises or dies,
  the others are stopped at once and one ``RankFailed`` names the rank to blame and why (its exception, exit code
  or signal); ranks that failed only because a peer vanished (a closed connection, a collective timeout) are not
  blamed. ``MSPECKV_DEBUG=1`` adds every rank's traceback as a note.
Collectives time out after ``MSPECKV_TP_TIMEOUT`` seconds (default 300 on GPUs, 60 on the CPU), so a rank whose
peer hangs reports an error instead of waiting forever.

NVLink multicast stays off: ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and
``NVSHMEM_DISABLE_NVLS=1`` are set in every rank's environment when absent (a value already set is kept).
Only rank 0 writes to stdout; the other ranks' stdout goes to /dev/null and their warnings are ignored.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import RankFailed, under_torchrun

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# a rank that failed with one of these lost a peer (or waited on one): it is not the cause
PEER_LOST = re.compile(r"Connection (closed|reset)|Broken pipe|timed? ?out|Timeout|DistNetworkError|DistBackendError"
                       r"|NCCL communicator was aborted|ncclRemoteError|peer", re.IGNORECASE)


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    device: torch.device
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0


def multicast_off() -> None:
    for k, v in MULTICAST_OFF.items():
        os.environ.setdefault(k, v)


def default_timeout(device_type: str) -> float:
    return float(os.environ.get("MSPECKV_TP_TIMEOUT") or (300 if device_type == "cuda" else 60))


def check_world(world: int, device_type: str, flag: str = "--tp") -> None:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"{flag} must be an integer >= 1, got {world!r}")
    if device_type == "cuda":
        n = torch.cuda.device_count()
        if world > n:
            raise ValueError(f"{flag} {world} needs {world} GPUs (one per rank); torch sees {n}: use {flag} {n} or "
                             f"less, or --device cpu (gloo) for a functional run")
    elif device_type != "cpu":
        raise ValueError(f"tensor parallelism runs on cuda (NCCL) or cpu (gloo), not {device_type}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(rank: int, world: int, device_type: str, local_rank: int, quiet: bool) -> Rank:
    multicast_off()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the host's cores
    if quiet and rank:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        warnings.simplefilter("ignore")
    return Rank(rank, world, device, backend)


RENDEZVOUS_S = 300  # ranks may take long to start (imports, CUDA contexts): joining is not a collective timeout


def _init(r: Rank, timeout_s: float, port: int | None) -> None:
    """The process group: from torchrun's environment (``port`` None), or over a TCP store on rank 0 at ``port``
    that waits up to RENDEZVOUS_S for the others to join, while collectives time out after ``timeout_s``."""
    kw = {"device_id": r.device} if r.backend == "nccl" else {}
    if port is None:
        kw["init_method"] = "env://"
    else:
        kw["store"] = dist.TCPStore("127.0.0.1", port, r.world, is_master=r.main,
                                    timeout=timedelta(seconds=max(RENDEZVOUS_S, timeout_s)))
    dist.init_process_group(r.backend, rank=r.rank, world_size=r.world, timeout=timedelta(seconds=timeout_s), **kw)


def _entry(i, world, device_type, port, timeout_s, fn, args, result_path, quiet):
    """One spawned rank (torch.multiprocessing passes the index first)."""
    r = _setup(i, world, device_type, i, quiet)
    _init(r, timeout_s, port)
    out = fn(r, *args)
    if i == 0 and result_path:
        tmp = result_path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(out, f)
        os.replace(tmp, result_path)
    _teardown()  # only on success: after a failure, tearing down could wait on the peers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: C++ threads of collectives must not be destroyed in arbitrary order


def _teardown() -> None:
    """Free what still references the process group (cycles holding work handles and tensors: without this, about
    one gloo run in ten aborted at exit with "terminate called without an active exception"), wait for every rank,
    then destroy a gloo group. An NCCL group is left to the process exit: ncclCommDestroy waits for every CUDA graph
    that captured one of its collectives to be destroyed first, and can hang (pytorch/pytorch#115388)."""
    gc.collect()
    dist.barrier()
    if dist.get_backend() != "nccl":
        dist.destroy_process_group()


def launch(fn, world: int, args: tuple = (), device_type: str = "cpu", timeout_s: float | None = None,
           quiet: bool = True):
    """Run ``fn(Rank, *args)`` on ``world`` ranks and return rank 0's value (under torchrun: this rank's value).
    ``fn`` must be a module-level function and ``args`` picklable (the ranks are fresh interpreters)."""
    timeout_s = default_timeout(device_type) if timeout_s is None else timeout_s
    if under_torchrun():
        n = int(os.environ["WORLD_SIZE"])
        if n != world:
            raise ValueError(f"--tp {world} but torchrun started {n} processes; pass --tp {n} (or "
                             f"--nproc-per-node {world})")
        check_world(world, device_type)
        r = _setup(int(os.environ["RANK"]), n, device_type, int(os.environ.get("LOCAL_RANK", 0)), quiet)
        _init(r, timeout_s, None)
        out = fn(r, *args)
        _teardown()
        return out
    check_world(world, device_type)
    multicast_off()  # inherited by the spawned ranks
    tmp = tempfile.mkdtemp(prefix="mspeckv-tp-")
    result = os.path.join(tmp, "rank0.pkl")
    port = free_port()
    import torch.multiprocessing as mp

    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # its "Terminating process" notes
    ctx = mp.start_processes(_entry, args=(world, device_type, port, timeout_s, fn, args, result, quiet),
                             nprocs=world, join=False, start_method="spawn")
    try:
        try:
            while not ctx.join(timeout=0.5):
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise _blame(ctx, world, e.error_index) from None
        except BaseException:  # Ctrl-C or anything else in the parent: never leave ranks behind
            _stop(ctx)
            raise
        with open(result, "rb") as f:
            return pickle.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(ctx) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    for p in ctx.processes:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Diverged|Failed)\b")


def _last_line(trace: str) -> str:
    """The exception line of a traceback ("Type: message"), even when the message runs over several lines."""
    lines = [x.rstrip() for x in trace.strip().splitlines() if x.strip()]
    for x in reversed(lines):
        if EXC_LINE.match(x):
            return x
    return lines[-1].strip() if lines else "an exception without a message"


def _blame(ctx, world: int, first: int) -> RankFailed:
    """One error for a failed run: the rank that caused it (the first whose failure was not losing a peer), what it
    did, and that the others were stopped. The join stopped every other rank (SIGTERM) before this runs."""
    why, traces, lost = {}, {}, set()
    for i, p in enumerate(ctx.processes):
        code = p.exitcode
        path = ctx.error_files[i]
        if path and os.access(path, os.R_OK) and os.path.getsize(path):
            with open(path, "rb") as f:
                traces[i] = pickle.load(f)
            why[i] = f"raised {_last_line(traces[i])}"
            if PEER_LOST.search(why[i]):
                lost.add(i)
        elif code is None or code == 0:
            continue
        elif code < 0:
            sig = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            why[i] = f"was killed by signal {sig}" + (" (out of host memory?)" if sig == "SIGKILL" else "")
            if sig == "SIGTERM" and i != first:
                lost.add(i)  # stopped by the join above, not a cause
        else:
            why[i] = f"exited with code {code} without a Python exception (os._exit or a crash in native code)"
    causes = [i for i in sorted(why) if i not in lost]
    stopped = [i for i in range(world) if why.get(i, "").endswith("SIGTERM") and i != first]
    if not causes and stopped and first in why and PEER_LOST.search(why[first]):  # a peer that stopped responding
        rank = stopped[0]
        msg = (f"tensor-parallel rank {rank} of {world} stopped responding: rank {first} gave up waiting for it in a "
               f"collective ({why[first]}); every rank was stopped")
    else:
        rank = first if first in causes or not causes else causes[0]
        others = [i for i in range(world) if i != rank]
        msg = (f"tensor-parallel rank {rank} of {world} {why.get(rank, 'failed')}; rank(s) "
               f"{', '.join(map(str, others))} were stopped")
    err = RankFailed(msg, rank, why)
    if os.environ.get("MSPECKV_DEBUG", "") not in ("", "0"):
        for i, t in sorted(traces.items()):
            err.add_note(f"--- rank {i} ---\n{t}")
    return err
