"""A dispatch-level counter for the speed guards: every aten op a block of code runs, the value
reads among them (each one a host sync on a GPU), and the copies that cross between the host
and a device (each one a host-to-device or device-to-host transfer in the step).

    with DispatchCounts() as counts:
        step(images, labels, seed=0)          # on the meta device: shapes only, no arithmetic
    assert counts.syncs == [] and counts.host_copies == []
    counts.total                               # aten ops dispatched (host work per step)

Run on the meta device, code runs with the shapes and devices of a GPU run but computes nothing,
so a CPU machine sees every op, value read and host copy the GPU run would make. A value read
on meta returns 0 here (so the code goes on and every read is counted).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# ops whose result size or value the host must wait for on a GPU
SYNCING_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), bool(t), int(t), if t: ...
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
}
COPY_OPS = {aten._to_copy.default, aten.copy_.default}


def _devices(value) -> set[str]:
    if isinstance(value, torch.Tensor):
        return {value.device.type}
    if isinstance(value, (list, tuple)):
        return set().union(*map(_devices, value)) if value else set()
    return set()


class DispatchCounts(TorchDispatchMode):
    """ops: Counter of op names; syncs: names of the syncing ops run; host_copies: (op, from,
    to) of each copy between the CPU and another device."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: list[str] = []
        self.host_copies: list[tuple[str, str, str]] = []

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        self.ops[name] += 1
        if func in SYNCING_OPS:
            self.syncs.append(name)
            if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
                return False if args[0].dtype == torch.bool else 0
        out = func(*args, **kwargs)
        if func in COPY_OPS:
            source = args[1] if func is aten.copy_.default else args[0]
            target = args[0] if func is aten.copy_.default else out
            kinds = (source.device.type, target.device.type)
            if "cpu" in kinds and kinds[0] != kinds[1]:
                self.host_copies.append((name, *kinds))
        return out
