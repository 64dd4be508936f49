"""Reading a built dataset: memory-mapped token shards and a stateless batch order.

The training stream is cut into non-overlapping windows of `seq_len + 1` tokens. Epoch e
visits the windows in a permutation drawn from (seed, e); the k-th sample of the run is
window `perm_e[k mod n]` with e = k div n. A batch is therefore a pure function of
(seed, step), so a resumed run reads exactly the batches an uninterrupted run would, with no
loader state to save; under data parallelism each rank takes its own slice of the step.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from hwattn.data.build import MANIFEST, VAL_DOCS, check_build


class TokenDataset:
    """A folder written by `hwattn data build`.

    train: (N,) memmap of token ids; val[domain]: (N_d,) memmaps; tokenizer; manifest.
    The folder is checked first (`hwattn.data.build.check_build`): every file the manifest
    lists is there and, with `verify` (default), hashes as recorded (about 0.1 s per 100M
    tokens); every shard holds its token count; the tokenizer is the manifest's. Anything
    else is a ValueError naming the folder, never a run on damaged data.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        man = self.path / MANIFEST
        if not man.is_file():
            raise ValueError(f"{self.path} is not a built dataset (no {MANIFEST}); "
                             "run `hwattn data build` first")
        self.manifest, self.tokenizer = check_build(self.path, verify=verify)
        dtype = np.dtype(self.manifest["dtype"])
        splits = self.manifest["splits"]
        self.train = np.memmap(self.path / splits["train"]["file"], dtype=dtype, mode="r")
        self.val = {d: np.memmap(self.path / e["file"], dtype=dtype, mode="r")
                    for d, e in splits["val"].items()}
        self.val_bytes = {d: e["bytes"] for d, e in splits["val"].items()}

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def domains(self) -> list[str]:
        return sorted(self.val)

    def val_documents(self) -> list[dict]:
        """The held-out documents as text ({"id", "source", "domain", "title", "text"})."""
        import gzip

        name = self.manifest.get("files", {}).get("val_docs", {}).get("file", VAL_DOCS)
        path = self.path / name
        opener = gzip.open if name.endswith(".gz") else open  # .gz: builds before plain files
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]


class BatchSampler:
    """Training batches as a pure function of the step.

    tokens: (N,) token array; batch_size sequences of seq_len per micro-batch; `rank` of
    `world` takes rows [rank·B, (rank+1)·B) of each global micro-batch.
    `batch(step, micro)` -> (x, y) int64 (B, T) each, y shifted by one.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, accum_steps: int = 1,
                 seed: int = 0, rank: int = 0, world: int = 1):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                            ("accum_steps", accum_steps), ("seed", seed), ("rank", rank),
                            ("world", world)):
            # Checked here, not at the first batch: numpy's generator refuses a negative or
            # fractional seed only when an epoch's permutation is drawn.
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        seq_len, batch_size, accum_steps = int(seq_len), int(batch_size), int(accum_steps)
        seed, rank, world = int(seed), int(rank), int(world)
        if seq_len < 1 or batch_size < 1 or accum_steps < 1:
            raise ValueError("seq_len, batch_size and accum_steps must be positive")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of the {world} ranks of the world")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.accum_steps = accum_steps
        self.seed = seed
        self.rank, self.world = rank, world
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"the training split ({len(tokens)} tokens) is shorter than one "
                             f"sequence of seq_len + 1 = {seq_len + 1} tokens; lower seq_len")
        self._perm = lru_cache(maxsize=2)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.accum_steps * self.world

    def window_ids(self, step: int, micro: int = 0) -> np.ndarray:
        per_micro = self.batch_size * self.world
        first = (step * self.accum_steps + micro) * per_micro + self.rank * self.batch_size
        ks = np.arange(first, first + self.batch_size)
        out = np.empty(self.batch_size, dtype=np.int64)
        for i, k in enumerate(ks):
            epoch, j = divmod(int(k), self.n_windows)
            out[i] = self._perm(epoch)[j]
        return out

    def epoch_of(self, step: int) -> float:
        return (step + 1) * self.tokens_per_step / (self.n_windows * self.seq_len)

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.seq_len
        rows = np.stack([np.asarray(self.tokens[w * t:w * t + t + 1], dtype=np.int64)
                         for w in self.window_ids(step, micro)])  # (B, T + 1)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]


def eval_window_count(n_tokens: int, seq_len: int, max_tokens: int | None = None) -> int:
    """How many windows `eval_windows` cuts from `n_tokens` tokens (0: too few for one)."""
    n = n_tokens if max_tokens is None else min(n_tokens, max_tokens + 1)
    return max(0, (n - 1) // seq_len)


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, seq_len + 1) windows covering `tokens` (the first `max_tokens`),
    each sharing its last token with the next window's first, so every token but the first
    is predicted exactly once, up to the last whole window (the final (n - 1) mod seq_len
    tokens are left out)."""
    count = eval_window_count(len(tokens), seq_len, max_tokens)
    if count < 1:
        n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
        raise ValueError(f"{n} tokens are fewer than one evaluation window of {seq_len + 1}")
    idx = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(tokens[:count * seq_len + 1], dtype=np.int64)[idx])
