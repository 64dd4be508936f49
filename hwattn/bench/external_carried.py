"""FlashMLA and FlashAttention-3 from a folder of prebuilt libraries, no package installed.

The GPU machines have no network and no FlashMLA / FA3 packages, and building either there takes
sources they cannot fetch. vLLM's x86-64 wheels carry both as standalone torch-op libraries
(`vllm/_flashmla_C.abi3.so`, `vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so`) that need nothing of
vLLM's Python code: only torch's own libraries, the CUDA runtime torch already loads
(libcudart.so.13) and the driver (libcuda.so.1). `benchmarks/fetch_external_kernels.sh` takes the
two out of a pinned wheel built for the machines' stack (torch 2.11.0 + CUDA 13.0),
xz-compresses them into a git-ignored folder (`.ext/`, about 8 MiB) and writes its
`MANIFEST.json`; carried there and named by `HWATTN_EXTERNAL_DIR`, `hwattn.bench.external` loads
them through `load` below.

`load(name)` checks before it loads anything, so a mismatch is a reason, not a crash: the
manifest lists the kernel, this process's torch is the one the library was built for (its C++
symbols would not match another) and has the same CUDA major version, the file unpacks to the
bytes the manifest's sha256 names. Then `torch.ops.load_library` registers the ops (a library
that does not dlopen says why) and every op the shim calls must have exactly the schema the shim
was written for (`SCHEMAS`, read off the vLLM 0.26.0 libraries).

The shims (`FlashMLA`, `FA3`) expose what `hwattn.bench.external`'s adapters call of the
`flash_mla` and `flash_attn_interface` packages, mapped onto the ops:

- FlashMLA: `get_mla_metadata(...)` returns an empty schedule holder and None, the first
  `flash_mla_with_kvcache` call fills it (the library's `dense_decode_fwd` computes the schedule
  when given none and returns it) and later calls reuse it, as upstream FlashMLA's interface
  since its sparse-attention release does.
- FA3: `flash_attn_with_kvcache` and `get_scheduler_metadata` pass their arguments to the ops
  `fwd` and `get_scheduler_metadata` as upstream FA3's `flash_attn_interface` does (batched
  queries, `seqused_k` = cache_seqlens, the page table, `qv`); vLLM's fork adds four trailing
  arguments (attention sinks, context parallelism), passed as "off".
"""

from __future__ import annotations

import functools
import json
import lzma
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwattn.data.sources import sha256_file

ENV = "HWATTN_EXTERNAL_DIR"
MANIFEST = "MANIFEST.json"

# op namespace each library registers, and the schemas the shims were written against (read
# off vLLM 0.26.0's libraries; whitespace does not matter, argument names and types do).
NAMESPACES = {"FlashMLA": "_flashmla_C", "FA3": "_vllm_fa3_C"}
SCHEMAS = {
    "FlashMLA": {
        "dense_decode_fwd": (
            "dense_decode_fwd(Tensor q, Tensor kcache, int head_size_v, Tensor seqlens_k, "
            "Tensor block_table, float softmax_scale, bool is_causal, "
            "Tensor(a)? tile_scheduler_metadata, Tensor(b)? num_splits, Tensor(c!)? out_) "
            "-> (Tensor(c!), Tensor, Tensor(a)?, Tensor(b)?)"),
    },
    "FA3": {
        "fwd": (
            "fwd(Tensor! q, Tensor k, Tensor v, Tensor? k_new, Tensor? v_new, Tensor? q_v, "
            "Tensor!? out, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? cu_seqlens_k_new, "
            "Tensor? seqused_q, Tensor? seqused_k, int? max_seqlen_q, int? max_seqlen_k, "
            "Tensor? page_table, Tensor? kv_batch_idx, Tensor? leftpad_k, Tensor? rotary_cos, "
            "Tensor? rotary_sin, Tensor? seqlens_rotary, Tensor? q_descale, Tensor? k_descale, "
            "Tensor? v_descale, float softmax_scale, bool is_causal, int window_size_left, "
            "int window_size_right, float softcap, bool is_rotary_interleaved, "
            "Tensor? scheduler_metadata, int num_splits, bool? pack_gqa, int sm_margin, "
            "Tensor? s_aux, int cp_world_size, int cp_rank, Tensor? cp_tot_seqused_k) "
            "-> Tensor[]"),
        "get_scheduler_metadata": (
            "get_scheduler_metadata(int batch_size, int max_seqlen_q, int max_seqlen_k, "
            "int num_heads, int num_heads_k, int headdim, int headdim_v, ScalarType qkv_dtype, "
            "Tensor seqused_k, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
            "Tensor? cu_seqlens_k_new, Tensor? seqused_q, Tensor? leftpad_k, int? page_size, "
            "int max_seqlen_k_new, bool is_causal, int window_size_left, "
            "int window_size_right, bool has_softcap, int num_splits, bool? pack_gqa, "
            "int sm_margin) -> Tensor"),
    },
}


class CarriedUnavailable(RuntimeError):
    """The carried library cannot be used in this process (the message says why)."""


@functools.lru_cache(maxsize=None)
def argument_names(schema: str) -> tuple[str, ...]:
    """The argument names of an op schema string, in order."""
    import torch

    return tuple(a.name for a in torch._C.parse_schema(schema).arguments)


def _signature(schema) -> list[tuple[str, str]]:
    """[(name, type)] of a FunctionSchema: what a caller passing arguments in order relies on."""
    return [(a.name, str(a.type)) for a in schema.arguments]


def torch_build() -> tuple[str, str | None]:
    """(torch version without its local suffix, CUDA version torch was built with or None)."""
    import torch

    return torch.__version__.split("+")[0], torch.version.cuda


def read_manifest(directory: str | os.PathLike) -> dict:
    """The folder's MANIFEST.json (what `fetch_external_kernels.sh` wrote), checked for the keys
    `load` reads; raises CarriedUnavailable naming the folder otherwise."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise CarriedUnavailable(f"{directory} is not a folder (run "
                                 "benchmarks/fetch_external_kernels.sh and carry its .ext)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CarriedUnavailable(f"{path} is missing (run benchmarks/fetch_external_kernels.sh)"
                                 ) from None
    except (OSError, ValueError) as err:
        raise CarriedUnavailable(f"{path} does not read as JSON ({err})") from None
    missing = [k for k in ("source", "torch", "cuda", "kernels") if k not in manifest]
    if missing:
        raise CarriedUnavailable(f"{path} lacks {', '.join(missing)}")
    return manifest


def lists(directory: str | os.PathLike, name: str) -> bool:
    """True if the folder's manifest lists `name` (raises CarriedUnavailable for a folder or
    manifest that does not read)."""
    return name in read_manifest(directory)["kernels"]


def check_build(manifest: dict, build: tuple[str, str | None] | None = None) -> None:
    """Raise CarriedUnavailable unless this process's torch is the one the libraries were built
    against: the same release (their C++ symbols name torch's internals) and CUDA major version
    (they link libcudart.so.<major>, which torch loads), on x86-64 Linux."""
    version, cuda = build or torch_build()
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise CarriedUnavailable(f"built for x86-64 Linux, this is {sys.platform} "
                                 f"{platform.machine()}")
    if version != manifest["torch"]:
        raise CarriedUnavailable(
            f"built against torch {manifest['torch']} (CUDA {manifest['cuda']}), this process "
            f"has torch {version}: its C++ symbols would not resolve (or worse, resolve wrongly)")
    if cuda is None:
        raise CarriedUnavailable(f"this torch {version} is a CPU build (CUDA {manifest['cuda']} "
                                 "needed)")
    if cuda.split(".")[0] != str(manifest["cuda"]).split(".")[0]:
        raise CarriedUnavailable(f"built against CUDA {manifest['cuda']}, this torch uses CUDA "
                                 f"{cuda}")


def unpack(directory: str | os.PathLike, entry: dict, cache: str | os.PathLike | None = None
           ) -> Path:
    """The library of one manifest entry as a file dlopen can read: the carried file itself
    if it is not compressed, else its `.xz` decompressed once into a folder of the temp dir
    named by its sha256 (reused while its bytes match). Raises CarriedUnavailable if the file
    is missing, does not decompress, or its sha256 is not the manifest's."""
    source = Path(directory) / entry["file"]
    if not source.is_file():
        raise CarriedUnavailable(f"{source} is missing (the manifest lists it)")
    if source.suffix != ".xz":
        target = source
        digest = sha256_file(target)
    else:
        folder = Path(cache or tempfile.gettempdir()) / f"hwattn-ext-{entry['sha256'][:16]}"
        target = folder / source.name[: -len(".xz")]
        digest = sha256_file(target) if target.is_file() else None
        if digest != entry["sha256"]:
            folder.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + f".{os.getpid()}.part")
            try:
                with lzma.open(source) as src, open(partial, "wb") as dst:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        dst.write(block)
            except (lzma.LZMAError, EOFError, OSError) as err:
                partial.unlink(missing_ok=True)
                raise CarriedUnavailable(f"{source} does not decompress ({err})") from None
            os.replace(partial, target)
            digest = sha256_file(target)
    if digest != entry["sha256"]:
        raise CarriedUnavailable(f"{target} has sha256 {digest[:12]}…, the manifest says "
                                 f"{entry['sha256'][:12]}… (not the file that was fetched)")
    return target


def _load_library(path: Path) -> None:
    import torch

    torch.ops.load_library(str(path))


def _namespace(namespace: str):
    import torch

    return getattr(torch.ops, namespace)


def bind_ops(name: str, namespace) -> dict[str, Any]:
    """{op: callable} for the ops the `name` shim calls, from a torch.ops namespace; raises
    CarriedUnavailable for an op the library does not register or whose schema is not the one
    the shim was written for (a shim passing arguments by position would then mix them up)."""
    import torch

    ops = {}
    for op, expected in SCHEMAS[name].items():
        try:
            packet = getattr(namespace, op)
            schema = packet.default._schema
        except (AttributeError, RuntimeError):
            raise CarriedUnavailable(f"the library registers no op {NAMESPACES[name]}::{op}"
                                     ) from None
        want = _signature(torch._C.parse_schema(expected))
        if _signature(schema) != want:
            raise CarriedUnavailable(
                f"{NAMESPACES[name]}::{op} has schema {schema}, the shim was written for "
                f"{expected}")
        ops[op] = packet.default
    return ops


def _positional(schema: str, values: dict) -> list:
    """`values` ({argument name: value}, every argument) in the schema's order."""
    names = argument_names(schema)
    if set(names) != set(values):
        raise TypeError(f"arguments {sorted(set(names) ^ set(values))} do not match {schema}")
    return [values[n] for n in names]


@dataclass
class SchedMeta:
    """FlashMLA's tile-scheduler metadata holder: empty until the first call fills it. `shape`
    is the call it was made for ((B, L_q, H_q, page, H_kv, causal)); reusing it for another
    raises, as upstream's interface does."""

    tile_scheduler_metadata: Any = None
    num_splits: Any = None
    shape: tuple | None = None


class FlashMLA:
    """The `flash_mla` calls `hwattn.bench.external.flash_mla_call` makes, on the carried
    library's `dense_decode_fwd` (bf16/fp16 dense paged decode, sm_90)."""

    def __init__(self, ops: dict, version: str):
        self._ops = ops
        self.__version__ = version

    def get_mla_metadata(self, *args, **kwargs) -> tuple[SchedMeta, None]:
        """An empty schedule holder (the arguments, kept for the older interface, are unused)
        and None for num_splits."""
        return SchedMeta(), None

    def flash_mla_with_kvcache(self, q, k_cache, block_table, cache_seqlens, head_dim_v,
                               tile_scheduler_metadata, num_splits=None, softmax_scale=None,
                               causal=False):
        """(out (B, L_q, H_q, head_dim_v), lse (B, H_q, L_q)) of q (B, L_q, H_q, 576) over the
        paged cache (P, page, H_kv, 576) whose first head_dim_v dims are the value."""
        meta = tile_scheduler_metadata
        if not isinstance(meta, SchedMeta):
            raise TypeError("tile_scheduler_metadata must come from get_mla_metadata")
        if num_splits is not None:
            raise ValueError("num_splits must be None (the schedule holder carries it)")
        shape = (*q.shape[:3], k_cache.shape[1], k_cache.shape[2], bool(causal))
        if meta.shape is None:
            meta.shape = shape
        elif meta.shape != shape:
            raise ValueError(f"schedule metadata made for call {meta.shape}, used for {shape}")
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** -0.5
        schema = SCHEMAS["FlashMLA"]["dense_decode_fwd"]
        out, lse, meta.tile_scheduler_metadata, meta.num_splits = self._ops["dense_decode_fwd"](
            *_positional(schema, dict(
                q=q, kcache=k_cache, head_size_v=head_dim_v, seqlens_k=cache_seqlens,
                block_table=block_table, softmax_scale=float(softmax_scale),
                is_causal=bool(causal), tile_scheduler_metadata=meta.tile_scheduler_metadata,
                num_splits=meta.num_splits, out_=None)))
        return out, lse


def _contiguous_last(x):
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


class FA3:
    """The `flash_attn_interface` calls `hwattn.bench.external.fa3_call` makes, on the carried
    library's `fwd` and `get_scheduler_metadata` (vLLM's fork of FA3's Hopper kernels)."""

    def __init__(self, ops: dict, version: str):
        self._ops = ops
        self.__version__ = version

    def get_scheduler_metadata(self, batch_size, max_seqlen_q, max_seqlen_k, num_heads_q,
                               num_heads_kv, headdim, cache_seqlens, qkv_dtype=None,
                               headdim_v=None, page_size=None, causal=False,
                               window_size=(-1, -1), has_softcap=False, num_splits=0,
                               pack_gqa=None, sm_margin=0):
        """FA3's schedule for a `flash_attn_with_kvcache` call with these sizes (an int32
        tensor the call takes as `scheduler_metadata`)."""
        import torch

        schema = SCHEMAS["FA3"]["get_scheduler_metadata"]
        return self._ops["get_scheduler_metadata"](*_positional(schema, dict(
            batch_size=batch_size, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            num_heads=num_heads_q, num_heads_k=num_heads_kv, headdim=headdim,
            headdim_v=headdim_v or headdim, qkv_dtype=qkv_dtype or torch.bfloat16,
            seqused_k=cache_seqlens.contiguous(), cu_seqlens_q=None, cu_seqlens_k=None,
            cu_seqlens_k_new=None, seqused_q=None, leftpad_k=None, page_size=page_size,
            max_seqlen_k_new=0, is_causal=bool(causal), window_size_left=window_size[0],
            window_size_right=window_size[1], has_softcap=has_softcap, num_splits=num_splits,
            pack_gqa=pack_gqa, sm_margin=sm_margin)))

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, qv=None, cache_seqlens=None,
                                page_table=None, softmax_scale=None, causal=False,
                                window_size=(-1, -1), softcap=0.0, scheduler_metadata=None,
                                num_splits=0, pack_gqa=None, sm_margin=0,
                                return_softmax_lse=False):
        """out (B, L_q, H_q, D_v) of q (B, L_q, H_q, D) (plus qv (B, L_q, H_q, D_v) · v when
        given) over the paged caches k_cache (P, page, H_kv, D) / v_cache (P, page, H_kv, D_v)."""
        if softmax_scale is None:
            softmax_scale = (q.shape[-1] + (qv.shape[-1] if qv is not None else 0)) ** -0.5
        if cache_seqlens is not None:
            cache_seqlens = cache_seqlens.contiguous()
        q, k_cache, qv, page_table = (_contiguous_last(x) for x in (q, k_cache, qv, page_table))
        if v_cache.stride(-1) != 1 and v_cache.stride(-3) != 1:
            v_cache = v_cache.contiguous()
        schema = SCHEMAS["FA3"]["fwd"]
        out, lse, *_ = self._ops["fwd"](*_positional(schema, dict(
            q=q, k=k_cache, v=v_cache, k_new=None, v_new=None, q_v=qv, out=None,
            cu_seqlens_q=None, cu_seqlens_k=None, cu_seqlens_k_new=None, seqused_q=None,
            seqused_k=cache_seqlens, max_seqlen_q=None, max_seqlen_k=None, page_table=page_table,
            kv_batch_idx=None, leftpad_k=None, rotary_cos=None, rotary_sin=None,
            seqlens_rotary=None, q_descale=None, k_descale=None, v_descale=None,
            softmax_scale=float(softmax_scale), is_causal=bool(causal),
            window_size_left=window_size[0], window_size_right=window_size[1],
            softcap=float(softcap), is_rotary_interleaved=True,
            scheduler_metadata=scheduler_metadata, num_splits=num_splits, pack_gqa=pack_gqa,
            sm_margin=sm_margin, s_aux=None, cp_world_size=1, cp_rank=0,
            cp_tot_seqused_k=None)))
        return (out, lse) if return_softmax_lse else out


SHIMS = {"FlashMLA": FlashMLA, "FA3": FA3}
_LOADED: dict[tuple[str, str], Any] = {}


def load(name: str, directory: str | os.PathLike | None = None):
    """The shim of kernel `name` ("FlashMLA" or "FA3") on the library carried in `directory`
    (default: $HWATTN_EXTERNAL_DIR); raises CarriedUnavailable saying why it cannot be used.
    A library is loaded once per process (later calls return the same shim, or raise the same
    reason)."""
    if name not in SHIMS:
        raise ValueError(f"name must be one of {tuple(SHIMS)}, got {name!r}")
    directory = directory if directory is not None else os.environ.get(ENV)
    if not directory:
        raise CarriedUnavailable(f"{ENV} is not set")
    key = (os.path.realpath(directory), name)
    if key not in _LOADED:
        try:
            _LOADED[key] = _load(name, directory)
        except CarriedUnavailable as err:
            _LOADED[key] = err
    result = _LOADED[key]
    if isinstance(result, CarriedUnavailable):
        raise result
    return result


def _load(name: str, directory) -> Any:
    manifest = read_manifest(directory)
    entry = manifest["kernels"].get(name)
    if entry is None:
        raise CarriedUnavailable(f"{Path(directory) / MANIFEST} lists no {name}")
    check_build(manifest)
    path = unpack(directory, entry)
    try:
        _load_library(path)
    except OSError as err:  # dlopen: a missing libcuda.so.1 / libcudart, an undefined symbol
        cause = err.__cause__ or err  # torch wraps dlopen's message ("Could not load ...")
        raise CarriedUnavailable(f"{path.name} does not load ({str(cause)[:300]})") from None
    ops = bind_ops(name, _namespace(NAMESPACES[name]))
    version = f"{Path(entry['file']).name} of {manifest['source']} (carried)"
    return SHIMS[name](ops, version)
