"""Does one training micro-batch fit in memory? Checked before a run starts.

The backward pass needs every tensor the forward saved for it, all alive at once when the
forward ends. Their size is measured, not modelled: batches of one and of two short sequences
go through the forward (with the training loss and autocast) while
`torch.autograd.graph.saved_tensors_hooks` adds up the storages it keeps, parameters left out.
The bytes grow linearly with the batch (every op but the loss's weight gradient is per
sequence), and per sequence at least linearly with its length (attention's weights, where a
kernel keeps them, grow with its square), so scaling the measurement up to the run's batch and
length gives a lower bound on a step's peak: the gradients, optimizer state and kernels'
scratch come on top. A batch whose bound exceeds the
memory free on the device cannot run, and is refused before any data is built or any step
taken rather than left to the out-of-memory killer (or to hours of swapping). Not under
`torch.compile`, which may recompute in the backward what eager mode keeps: callers skip the
check there.
"""

from __future__ import annotations

import os

import torch

from hwattn.config import ModelConfig
from hwattn.eval.perplexity import autocast_for
from hwattn.models.transformer import Transformer
from hwattn.train.loss import linear_cross_entropy

GIB = 2**30


def saved_bytes(config: ModelConfig, seq_len: int, device: torch.device, amp: str = "auto",
                probe_len: int = 256) -> tuple[int, int]:
    """(bytes per sequence, bytes once per micro-batch), at least, that the forward of training
    sequences of `seq_len` tokens keeps for the backward on `device` under `amp` (autocast as
    the trainer sets it), parameters not counted. Measured on batches of one and two sequences
    of min(`seq_len`, `probe_len`) tokens, so that it costs little at any length: the
    difference is what each sequence adds (scaled to `seq_len`), the rest is kept once (the
    fused loss's weight gradient)."""
    with torch.device("meta"):  # no initialisation (nor the RNG draws it makes): the values
        model = Transformer(config)  # do not change what the forward keeps
    model = model.to_empty(device=device)
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.detach().zero_()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    length = min(seq_len, probe_len)

    def measure(batch: int) -> int:
        kept: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in params:  # a view shares its base's storage: counted once
                kept[storage._cdata] = storage.nbytes()
            return tensor

        x = torch.zeros((batch, length), dtype=torch.long, device=device)  # (B, T)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                autocast_for(device, amp):
            loss = linear_cross_entropy(model(x, hidden_only=True), model.output.weight, x)
        del loss
        return sum(kept.values())

    one, two = measure(1), measure(2)
    return (two - one) * seq_len // length, max(0, 2 * one - two)


def free_bytes(device: torch.device) -> int | None:
    """Memory the device has free now: a GPU's free memory, or the host's available memory
    (Linux `MemAvailable`); None where it cannot be told. On a GPU the blocks PyTorch has
    cached but not handed out count as free (this process allocates from them first), as
    the engine's page planner counts them: a run after another in the same process (a
    notebook, a second `run_compare`) found only what the first had left uncached."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_fits(configs: list[ModelConfig], seq_len: int, batch_size: int,
                     device: torch.device, amp: str = "auto", flag: str = "--batch-size") -> None:
    """ValueError naming `flag`, the bytes one micro-batch of `batch_size` keeps for the
    backward (the largest over `configs`), the memory free on `device` and the batch above
    which none can fit, when this one cannot. Nothing is checked where the free memory is
    unknown."""
    free = free_bytes(device)
    if free is None:
        return
    per_seq, once = max((saved_bytes(c, seq_len, device, amp) for c in configs),
                        key=lambda m: m[0] * batch_size + m[1])
    need = once + batch_size * per_seq
    if need <= free:
        return
    fits = max(0, free - once) // max(1, per_seq)
    advice = (f"above {fits:,} it cannot fit" if fits else
              "not even one sequence fits: lower the sequence length")
    raise ValueError(f"{flag} {batch_size}: one micro-batch keeps at least {need / GIB:,.1f} GiB "
                     f"for the backward pass ({per_seq / 2**20:,.2f} MiB per sequence of "
                     f"{seq_len} tokens), more than the {free / GIB:,.1f} GiB free on {device}; "
                     f"{advice}")
