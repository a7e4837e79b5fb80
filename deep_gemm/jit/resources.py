"""Read ptxas' ``-v`` report (registers, spills, stack, static shared memory), which CI uses to catch spills and
ignored ``setmaxnreg`` without a GPU. NVRTC (``--ptxas-options=-v``) and nvcc (``-Xptxas -v``) print the same report,
one block per entry function::

    ptxas info    : (C7508) Potential Performance Loss: 'setmaxnreg' ignored; ...
    ptxas info    : Compiling entry function 'k' for 'sm_90a'
    ptxas info    : Function properties for k
    ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 168 registers, used 0 barriers, 8 bytes smem
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Optional

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SHARED = re.compile(r"(\d+) bytes smem")
# Some performance problems come as "info" with a code in parentheses (C7508: setmaxnreg ignored): warnings too.
_WARNING = re.compile(r"warning|\(C\d{4}\)", re.IGNORECASE)


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reported for one kernel. ``shared_bytes`` is static shared memory only (the GEMM's tile ring is
    dynamic, sized at launch). ``warnings`` holds every warning line of the whole compiler log (ptxas does not say
    which function a warning such as C7508 belongs to)."""
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int
    warnings: tuple = ()

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0

    @property
    def wgmma_serialized(self) -> bool:
        """True if ptxas serialised the wgmmas (C7514: registers of an in-flight wgmma read too early)."""
        return any("C7514" in line for line in self.warnings)

    @property
    def setmaxnreg_ignored(self) -> bool:
        """True if ptxas dropped ``setmaxnreg`` (C7508): the producer/consumer register split silently didn't happen."""
        return any("C7508" in line for line in self.warnings)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KernelResources":
        """Inverse of to_dict; raises ValueError/TypeError/KeyError on bad input."""
        ints = {k: int(d[k]) for k in ("registers", "spill_store_bytes",
                                        "spill_load_bytes", "stack_bytes", "shared_bytes")}
        warnings = d.get("warnings", [])
        if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            raise ValueError("warnings must be a list of strings")
        return cls(warnings=tuple(warnings), **ints)


def parse_ptxas_report(log: str, kernel_name: str) -> Optional[KernelResources]:
    """The resources of entry function ``kernel_name``, or None if the log has no report for it (wrong name, no -v)."""
    lines = log.splitlines()
    start = None
    for i, line in enumerate(lines):
        m = _ENTRY.search(line)
        if m and m.group(1) == kernel_name:
            start = i
            break
    if start is None:
        return None
    end = len(lines)
    for i in range(start + 1, len(lines)):
        if _ENTRY.search(lines[i]):
            end = i
            break
    block = lines[start:end]
    registers = shared = None
    frame = None
    for i, line in enumerate(block):
        m = _PROPERTIES.search(line)
        # Non-inlined device functions get their own "Function properties" block here; only the entry's counts.
        if m and m.group(1) == kernel_name and frame is None:
            for follow in block[i + 1:i + 3]:
                f = _FRAME.search(follow)
                if f:
                    frame = tuple(int(x) for x in f.groups())
                    break
        if registers is None:
            r = _REGISTERS.search(line)
            if r:
                registers = int(r.group(1))
                s = _SHARED.search(line)
                shared = int(s.group(1)) if s else 0
    if registers is None:
        return None
    stack, spill_st, spill_ld = frame if frame is not None else (0, 0, 0)
    warnings = tuple(line.strip() for line in lines if _WARNING.search(line))
    return KernelResources(registers=registers, spill_store_bytes=spill_st, spill_load_bytes=spill_ld,
                           stack_bytes=stack, shared_bytes=shared, warnings=warnings)
