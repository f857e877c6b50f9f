"""Random projections of gradients to ``k`` dimensions (TRAK, Park et al. 2023; LESS, Xia et al. 2024).

:class:`RandomProjection` maps gradients to ``k`` dimensions with a seeded Rademacher (or Gaussian)
matrix scaled by ``1/sqrt(k)``, generated block by block so the ``D x k`` matrix is never held whole
(unless it is small enough to cache).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from rmlab.errors import ArgumentError

#: Bytes of projection matrix kept in memory between batches (regenerated block by block beyond).
PROJECTION_CACHE_BYTES = {"cpu": 1 << 28, "cuda": 1 << 30}
#: Entries of one generated block of a projection matrix.
_PROJECTION_BLOCK = 1 << 22


class RandomProjection:
    """``x -> x @ P``: a seeded random ``D x k`` matrix, never held whole unless it is small.

    The gradient projection of TRAK (Park et al. 2023) and LESS (Xia et al. 2024), after the
    Johnson-Lindenstrauss lemma (Achlioptas 2003 for the +-1 entries).

    ``P`` has entries ``+-1/sqrt(k)`` (``kind="rademacher"``, as TRAK and LESS) or ``N(0, 1/k)``
    (``"gaussian"``), so ``E[<Pu, Pv>] = <u, v>`` and, with high probability,
    ``|<Pu, Pv> - <u, v>| <= eps |u| |v|`` for ``eps`` a few times ``sqrt(2/k)`` (Johnson-Lindenstrauss).
    ``sizes`` splits the ``D`` input coordinates into segments (one per parameter tensor); each
    segment's rows of ``P`` are generated in blocks of about 4M entries, each block from its own
    generator seeded by ``(seed, segment, block)``: the same seed gives the same matrix on a device
    type whatever the batch sizes. Blocks are cached when the whole matrix fits ``cache_bytes``;
    otherwise each call regenerates them (a projection then costs generating ``D x k`` random signs).
    """

    def __init__(self, sizes, dim_out: int, *, seed: int = 0, kind: str = "rademacher",
                 device="cpu", cache_bytes: int | None = None):
        if kind not in ("rademacher", "gaussian"):
            raise ArgumentError(f"projection kind={kind!r} is not supported; choose 'rademacher' or 'gaussian'.")
        self.sizes = [int(sizes)] if isinstance(sizes, numbers.Integral) else [int(v) for v in sizes]
        self.dim_in, self.dim_out, self.seed, self.kind = sum(self.sizes), int(dim_out), int(seed), kind
        self.device = torch.device(device)
        self.rows = max(1, _PROJECTION_BLOCK // self.dim_out)
        limit = cache_bytes if cache_bytes is not None else PROJECTION_CACHE_BYTES.get(self.device.type, 1 << 28)
        self.cache: dict | None = {} if self.dim_in * self.dim_out * 4 <= limit else None

    @property
    def blocks(self) -> int:
        return sum(math.ceil(size / self.rows) for size in self.sizes)

    def block(self, segment: int, b: int) -> torch.Tensor:
        """Rows ``[b * rows, (b + 1) * rows)`` of segment ``segment`` of ``sqrt(k) * P``."""
        key = (segment, b)
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        n = min(self.rows, self.sizes[segment] - b * self.rows)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(np.random.SeedSequence([self.seed, segment, b]).generate_state(1)[0]))
        if self.kind == "rademacher":
            signs = torch.randint(0, 2, (n, self.dim_out), generator=gen, device=self.device, dtype=torch.int8)
            out = signs.to(torch.float32).mul_(2.0).sub_(1.0)
        else:
            out = torch.randn(n, self.dim_out, generator=gen, device=self.device, dtype=torch.float32)
        if self.cache is not None:
            self.cache[key] = out
        return out

    def __call__(self, x) -> torch.Tensor:
        """Project ``(n, D)`` rows (a tensor, or :class:`~rmlab.engine.grads.Gradients`, whose
        parameters are the segments) to ``(n, k)`` float32."""
        if not isinstance(x, torch.Tensor):  # Gradients: one (n, numel_p) matrix per parameter
            segments, n = [x.matrix(p) for p in range(len(self.sizes))], x.n
        else:
            if x.shape[-1] != self.dim_in:
                raise ValueError(f"expected rows of {self.dim_in} values, got {x.shape[-1]}")
            segments, n = list(torch.split(x, self.sizes, dim=1)), x.shape[0]
        out = torch.zeros(n, self.dim_out, dtype=torch.float32, device=self.device)
        for s, segment in enumerate(segments):
            segment = segment.to(self.device, torch.float32)
            for b in range(math.ceil(self.sizes[s] / self.rows)):
                lo = b * self.rows
                out.addmm_(segment[:, lo : lo + self.rows], self.block(s, b))
        return out.mul_(1.0 / math.sqrt(self.dim_out))
