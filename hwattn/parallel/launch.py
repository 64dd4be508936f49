"""Worker processes for tensor-parallel serving: rank 0 is the engine's process, ranks
1..N-1 are spawned here. Every step rank 0 broadcasts the `StepInput` over a gloo control
group, then all ranks run the same forward (tensor all-reduces on the data group: gloo on CPU,
NCCL on GPU) and rank 0 samples.

NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1): set before the children are
spawned, so they inherit it, and again inside each child.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, backend: str):
    os.environ.update(NO_MULTICAST)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10))
    ctrl = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return dist.group.WORLD, ctrl


def build_rank(rank: int, world: int, build: dict, group):
    """This rank's sharded model (see `hwattn.engine.loader.build_model` for `build`)."""
    from hwattn.engine.loader import build_model
    from hwattn.parallel.tp import shard_model

    build = dict(build)
    if build.get("device") is not None and torch.device(build["device"]).type == "cuda":
        build["device"] = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    model = build_model(**build)
    return shard_model(model, rank, world, group)


def _worker(rank: int, world: int, port: int, backend: str, build: dict, runner_kwargs: dict):
    from hwattn.engine.model_runner import ModelRunner

    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    group, ctrl = _init(rank, world, port, backend)
    model = build_rank(rank, world, build, group)
    box = [None]
    dist.broadcast_object_list(box, src=0, group=ctrl)  # pool size decided by rank 0
    runner = ModelRunner(model, num_pages=box[0], **runner_kwargs)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=ctrl)
        if box[0] is None:
            break
        runner.execute(box[0])
    dist.destroy_process_group()


class TensorParallelRunner:
    """Rank 0's runner: forwards each step to the workers, then runs its own shard."""

    def __init__(self, runner, ctrl, procs):
        self.runner = runner
        self.ctrl = ctrl
        self.procs = procs
        self.device = runner.device
        self.kv_caches = runner.kv_caches

    def __getattr__(self, name):  # graphs, kv_cache_bytes, ... of the local runner
        return getattr(self.__dict__["runner"], name)

    def execute(self, step):
        dist.broadcast_object_list([step], src=0, group=self.ctrl)
        return self.runner.execute(step)

    def shutdown(self) -> None:
        if not self.procs:
            return
        try:
            dist.broadcast_object_list([None], src=0, group=self.ctrl)
        finally:
            for p in self.procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.terminate()
            self.procs = []
            if dist.is_initialized():
                dist.destroy_process_group()


def start_tensor_parallel(world: int, build: dict, runner_kwargs: dict, plan_pages):
    """Spawn ranks 1..world-1, join them as rank 0 and build every rank's runner.

    build: keyword arguments of `build_model`. runner_kwargs: of `ModelRunner` (but
    num_pages). plan_pages(model) -> num_pages, called on rank 0's sharded model.
    Returns (TensorParallelRunner, rank 0's sharded model, num_pages).
    """
    from hwattn.engine.model_runner import ModelRunner

    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process; one tensor-parallel "
                           "engine per process")
    device = build.get("device")
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda and torch.cuda.device_count() < world:
        raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs, "
                         f"found {torch.cuda.device_count()}")
    backend = "nccl" if cuda else "gloo"
    os.environ.update(NO_MULTICAST)
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, port, backend, build, runner_kwargs),
                         daemon=True) for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        group, ctrl = _init(0, world, port, backend)
        model = build_rank(0, world, build, group)
        num_pages = plan_pages(model)
        dist.broadcast_object_list([num_pages], src=0, group=ctrl)
        runner = ModelRunner(model, num_pages=num_pages, **runner_kwargs)
    except BaseException:
        for p in procs:
            p.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    return TensorParallelRunner(runner, ctrl, procs), model, num_pages
