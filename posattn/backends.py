"""What each fused backend declares it supports, and every reason it refuses.

A backend runs a problem only if the problem's dtype, device and head dim are
declared and **every** encoding in it is declared (by its type, with an optional
check of its options). Anything not declared is refused with a reason naming it:
a new encoding stays off a backend until that backend declares it (fail closed),
never silently dropped. The machine-dependent checks (Triton importable, a GPU of
the right capability, the extension built) stay with each backend (_triton.py,
_cuda.py) and are added to these reasons.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._validate import Problem
from .encodings import Encoding

Check = Callable[[Encoding, Problem], Optional[str]]


@dataclass(frozen=True)
class Declaration:
    name: str
    dtypes: Tuple[torch.dtype, ...]
    max_head_dim: int
    encodings: Dict[type, Optional[Check]] = field(default_factory=dict)   # type -> extra check (or None)
    checks: Tuple[Callable[[Problem], Optional[str]], ...] = ()            # problem-wide checks

    def reasons(self, p: Problem) -> List[str]:
        """Every reason this backend cannot compute ``p`` (empty: it can)."""
        out = []
        if p.q.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"{str(p.q.dtype).replace('torch.', '')} is not supported ({names})")
        if p.D > self.max_head_dim:
            out.append(f"head dim {p.D} > {self.max_head_dim}")
        for e in p.encodings:
            if type(e) not in self.encodings:
                out.append(f"{type(e).__name__} ({e.keyword}=) is not implemented by the {self.name} backend")
                continue
            check = self.encodings[type(e)]
            why = check(e, p) if check is not None else None
            if why:
                out.append(why)
        for check in self.checks:
            why = check(p)
            if why:
                out.append(why)
        return out

    def refusal(self, p: Problem) -> Optional[str]:
        reasons = self.reasons(p)
        return "; ".join(reasons) if reasons else None
