"""One tensor-parallel rank, started by `TensorParallelExecutor` as
`python -m hwattn.engine.tp_worker`.

Life of a rank: receive the build spec, join the process group through the parent's store,
build and shard the model, plan its page pool (the parent picks the smallest plan of all
ranks), allocate the cache (capturing CUDA graphs on GPUs), then answer steps until told to
stop. Every rank runs every step (the forward's all-reduces need them all); rank 0 samples
and replies. An exception in a `call` goes back to the parent and the rank serves on; any
other goes to the parent with its traceback and ends the process.
"""

from __future__ import annotations

from hwattn.parallel.worker import ParentLink, destroy_process_group, fault_point, init_process_group


def build_rank(link: ParentLink, spec: dict):
    import torch
    import torch.distributed as dist

    from hwattn.engine.block_manager import plan_pages
    from hwattn.engine.loader import build_model, resolve_dtype
    from hwattn.engine.model_runner import ModelRunner, compose_absorptions_for_serving
    from hwattn.parallel.tp import shard_model

    rank, world = link.rank, link.world
    torch.set_num_threads(spec["threads"])
    fault_point("rank", "build", rank)
    build = dict(spec["build"])
    device = torch.device(build["device"])
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        build["device"] = f"cuda:{rank}"
        backend = "nccl"
    init_process_group(link, backend, spec["setup_timeout"], spec["collective_timeout"])
    model = shard_model(build_model(**build), rank, world, dist.group.WORLD)
    compose_absorptions_for_serving(model)  # (its weights count before the cache is sized)
    dtype = resolve_dtype(build["dtype"], model.tok_embeddings.weight.device)
    per_token = model.kv_bytes_per_token(1, dtype)  # this rank's real layout
    link.send(("planned", plan_pages(spec["engine_config"], per_token,
                                     model.tok_embeddings.weight.device, spec["max_model_len"])))
    _, num_pages = link.recv()
    runner = ModelRunner(model, num_pages=num_pages, **spec["runner"])
    link.send(("ready", dict(kv_bytes_per_token=per_token, device=str(runner.device),
                             cuda_graphs=bool(runner.graphs), graph_error=runner.graph_error)))
    return runner


def serve(link: ParentLink, runner) -> None:
    """Answer steps until ("stop",)."""
    rank, count = link.rank, 0
    while True:
        message = link.recv()
        kind = message[0]
        if kind == "stop":
            return
        count += 1
        fault_point("rank", "step", rank, count)
        if kind in ("call", "sync"):  # every rank answers these
            if kind == "call":
                result = _call(runner, message[1], message[2])
                if rank != 0 and result[0]:  # the parent returns rank 0's value alone
                    result = (True, None)
            else:
                result = _in_step(runner, message[-1])
            link.send(("result", result, message[-1]))
            continue
        if kind not in ("sample", "verify"):
            raise RuntimeError(f"unknown message {kind!r}")
        elif rank != 0:
            runner.execute(message[1])  # the forward only: rank 0 samples
            continue
        elif kind == "sample":
            result = runner.sample_step(message[1], message[2])
        else:
            result = runner.verify_step(message[1], message[2])
        if rank == 0:  # with the message's number: the parent drops replies it cut short
            link.send(("result", result, message[-1]))


def _call(runner, fn, args) -> tuple:
    """(True, `fn(runner, *args)`), or (False, (what it raised, the traceback)): a call that
    raises is its caller's error, and the rank serves on."""
    import traceback

    from hwattn.parallel.errors import summarize

    try:
        return True, fn(runner, *args)
    except Exception as err:  # noqa: BLE001 - sent back whole; the parent raises it
        return False, (summarize(err), traceback.format_exc())


def _in_step(runner, number: int) -> bool:
    """After a call failed on some rank: an all-reduce of the message's number, which every
    rank must reach and agree on before the group is trusted with another step. A rank left
    in another collective (or one that timed out) raises here, and the group fails."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([number], dtype=torch.int64, device=runner.device)
    dist.all_reduce(value)
    if int(value) != number * dist.get_world_size():
        raise RuntimeError(f"the ranks are out of step after a failed call: the all-reduce of "
                           f"message {number} gave {int(value)}")
    return True


def main() -> None:
    link = ParentLink()
    with link.phase("build"):
        _, spec = link.recv()
        runner = build_rank(link, spec)
    with link.phase("step"):
        serve(link, runner)
    with link.phase("shutdown"):
        fault_point("rank", "shutdown", link.rank)
        destroy_process_group()
        link.send(("bye",))
    link.exit(0)


if __name__ == "__main__":
    main()
