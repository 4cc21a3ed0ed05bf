"""Counting host syncs: the calls that make the CPU wait for the accelerator.

On a GPU the host queues kernels and runs ahead; every read of a device value on the host (`.item()`,
`float(t)`, `bool(t)` in an `if`, `.tolist()`) and every op whose output shape depends on device values
(`nonzero`, boolean-mask indexing, `masked_select`, `repeat_interleave` without `output_size`, `unique`)
stops it until the GPU has caught up, so the next step cannot be queued while this one computes.

`count_host_syncs()` counts those calls on any device, the CPU included, so a test on a machine without a
GPU can hold the training step to zero syncs. Copies to the host (`.tolist()`, `.numpy()`, `.cpu()`) are
counted by name, since on CPU they copy nothing. On CUDA, `torch.cuda.set_sync_debug_mode("warn")` is the
real arbiter (it also sees blocking host-to-device copies); `jobs/gpu_check.py` runs the step under it.

Not counted: scalar reads of CPU tensors made inside `torch.optim` (the optimizers keep `state["step"]` on
the host unless `capturable`, on every device, so those reads are no device sync).
"""
from __future__ import annotations

import sys
import traceback
from collections import Counter
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# ops that read a device value on the host, or whose output shape depends on device values
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "scalar read (.item(), float(), int(), bool())",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten.unique_consecutive.default: "unique",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",          # torch.unique(..., dim=d)
    _aten.repeat_interleave.Tensor: "repeat_interleave without output_size",
}
_BOOL_INDEXED = {_aten.index.Tensor: "boolean-mask indexing", _aten.index_put.default: "boolean-mask assignment",
                 _aten.index_put_.default: "boolean-mask assignment",
                 _aten._index_put_impl_.default: "boolean-mask assignment"}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)


def _in_optimizer() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if "/torch/optim/" in frame.f_code.co_filename.replace("\\", "/"):
            return True
        frame = frame.f_back
    return False


class HostSyncs(TorchDispatchMode):
    """Counts the host syncs of what runs inside it: `.total`, `.by_op` and `.where` (the innermost
    frames outside torch of each sync, to say which line to fix)."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self.where: Counter = Counter()        # "<what> at <file:line function>" -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _SYNC_OPS.get(func)
        if what is None and func in _BOOL_INDEXED and _bool_index(args):
            what = _BOOL_INDEXED[func]
        if what is not None and not (func is _aten._local_scalar_dense.default and _in_optimizer()):
            self.by_op[what] += 1
            self.where[f"{what} at {_caller()}"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def report(self) -> str:
        return "; ".join(f"{n}x {w}" for w, n in self.where.most_common()) or "none"

    def ours(self) -> int:
        """Syncs made by crosspt's own code (the innermost frame outside torch is in the crosspt package),
        not by a library it calls (transformers builds its SDPA masks with one `padding_mask.all()` each)."""
        return sum(n for w, n in self.where.items() if w.split(" at ", 1)[1].startswith("crosspt/"))


# reads that copy a tensor to the host: on a GPU a blocking device->host copy, on CPU no op at all, so
# they are caught by name before dispatch
_HOST_COPIES = {torch.Tensor.tolist: "copy to host (.tolist())", torch.Tensor.numpy: "copy to host (.numpy())",
                torch.Tensor.cpu: "copy to host (.cpu())"}


class _HostCopies(TorchFunctionMode):
    def __init__(self, counter: HostSyncs):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        what = _HOST_COPIES.get(func)
        if what is not None:
            self.counter.by_op[what] += 1
            self.counter.where[f"{what} at {_caller()}"] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The innermost stack frame outside torch (file:line function)."""
    for f in reversed(traceback.extract_stack()):
        path = f.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("/benchmarks/syncs.py"):
            return f"{'/'.join(path.split('/')[-3:])}:{f.lineno} {f.name}"
    return "?"


@contextmanager
def count_host_syncs():
    """`with count_host_syncs() as syncs: ...` then `syncs.total`, `syncs.report()`."""
    mode = HostSyncs()
    with _HostCopies(mode), mode:
        yield mode
