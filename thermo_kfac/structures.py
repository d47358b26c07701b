"""Structured square matrices for SINGD's Kronecker factor roots (Lin, Dangel et al. 2024).

Every structure is a matrix group closed under products (so ``K (I - beta m)`` stays structured)
and a linear space; it stores only its free parameters. Each one provides

* :meth:`Structure.project`: the orthogonal (Frobenius) projection of a dense matrix onto the
  structure (idempotent);
* :meth:`Structure.from_symmetric`: SINGD's ``Pi_hat`` of a *symmetric* matrix ``S``, the structured
  ``P`` with ``P + P^T`` equal to ``2 S`` on the structure's support: entries whose transposed
  position is outside the support are doubled (so triangular structures keep the off-diagonal
  mass of ``S``), for symmetric supports it equals :meth:`project`;
* :meth:`Structure.from_inner`: ``Pi_hat(Y^T Y)`` (cheap paths for diagonal and block-diagonal);
* :meth:`Structure.matmul` (``S @ M`` or ``S^T @ M``), :meth:`Structure.rmatmul` (``M @ S`` or
  ``M @ S^T``), :meth:`Structure.compose` (structured ``S1 @ S2``), ``trace``, ``frob_sq``;
* :meth:`Structure.numel` / :meth:`Structure.nbytes`: the memory footprint.

Structures (``name``: parameters):

* ``dense``: the full matrix, ``d^2``.
* ``diagonal``: ``d``.
* ``block``: block-diagonal with ``block_size`` blocks (the last block takes the remainder).
* ``hierarchical``: ``[[A, B, C], [0, D, E], [0, 0, F]]`` with dense ``A`` (``k1 x k1``) and ``F``
  (``k2 x k2``), diagonal ``D`` and dense ``B, C, E``: ``O(d (k1 + k2))``.
* ``toeplitz``: lower-triangular Toeplitz, ``d`` (applied through a dense ``d x d`` temporary).
* ``lowrank``: ``[[A, 0], [B, D]]`` with dense ``A`` (``rank x rank``), dense ``B`` and diagonal
  ``D``; ``K K^T`` is then *diagonal plus rank-``rank``*, the low-rank preconditioner of the paper,
  in a form that is a group. Parameters ``O(d rank)``.

All operations run in the tensors' own dtype (bfloat16 included); nothing is upcast.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from hw_models.validation import check_choice, check_positive

Params = dict[str, torch.Tensor]


class Structure:
    """A structured ``dim x dim`` matrix given by named parameter tensors."""

    name: ClassVar[str] = "base"

    def __init__(self, dim: int, params: Params, **opts: Any) -> None:
        self.dim = dim
        self.params = params
        self.opts = opts

    # ------------------------------------------------------------------ construction
    @classmethod
    def _layout(cls, dim: int, **opts: Any) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters."""
        raise NotImplementedError

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype = torch.float32, device: Any = None,
              **opts: Any) -> Structure:
        """The zero matrix."""
        opts = cls.normalize_options(dim, **opts)
        return cls(dim, {k: torch.zeros(s, dtype=dtype, device=device)
                         for k, s in cls._layout(dim, **opts).items()}, **opts)

    @classmethod
    def identity(cls, dim: int, dtype: torch.dtype = torch.float32, device: Any = None,
                 **opts: Any) -> Structure:
        """The identity matrix."""
        eye = torch.eye(dim, dtype=dtype, device=device)
        return cls.project(eye, **opts)

    @classmethod
    def normalize_options(cls, dim: int, **opts: Any) -> dict[str, Any]:
        """Validated options, clamped to ``dim``."""
        if opts:
            raise ValueError(f"structure {cls.name!r} takes no options, got {sorted(opts)}")
        return {}

    @classmethod
    def project(cls, X: torch.Tensor, **opts: Any) -> Structure:
        """Orthogonal projection of the dense square ``X`` onto the structure."""
        raise NotImplementedError

    @classmethod
    def from_symmetric(cls, S: torch.Tensor, **opts: Any) -> Structure:
        """SINGD's ``Pi_hat(S)`` of a symmetric ``S`` (see the module docstring)."""
        return cls.project(S, **opts)

    @classmethod
    def from_inner(cls, Y: torch.Tensor, **opts: Any) -> Structure:
        """``Pi_hat(Y^T Y)`` for ``Y`` of shape ``(N, dim)``."""
        return cls.from_symmetric(Y.T @ Y, **opts)

    def gram(self) -> Structure:
        """``Pi_hat(S^T S)``."""
        return type(self).from_inner(self.to_dense(), **self.opts)

    def _new(self, params: Params) -> Structure:
        return type(self)(self.dim, params, **self.opts)

    # ------------------------------------------------------------------ linear algebra
    def to_dense(self) -> torch.Tensor:
        """The full ``dim x dim`` matrix."""
        raise NotImplementedError

    def matmul(self, M: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``S @ M`` (or ``S^T @ M``) for dense ``M`` with ``dim`` rows."""
        S = self.to_dense()
        return (S.T if transpose else S) @ M

    def rmatmul(self, M: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``M @ S`` (or ``M @ S^T``) for dense ``M`` with ``dim`` columns."""
        return self.matmul(M.T, transpose=not transpose).T

    def compose(self, other: Structure) -> Structure:
        """Structured product ``self @ other`` (structures are closed under products)."""
        return type(self).project(self.matmul(other.to_dense()), **self.opts)

    def add(self, other: Structure, alpha: float = 1.0) -> Structure:
        """``self + alpha * other``."""
        return self._new({k: v + alpha * other.params[k] for k, v in self.params.items()})

    def scale(self, alpha: float) -> Structure:
        """``alpha * self``."""
        return self._new({k: alpha * v for k, v in self.params.items()})

    def add_identity(self, alpha: float) -> Structure:
        """``self + alpha * I``."""
        eye = type(self).identity(self.dim, self.dtype, self.device, **self.opts)
        return self.add(eye, alpha)

    def trace(self) -> torch.Tensor:
        """``tr(S)``."""
        return self.to_dense().diagonal().sum()

    def frob_sq(self) -> torch.Tensor:
        """``tr(S^T S)`` (squared Frobenius norm)."""
        return sum((p * p).sum() for p in self.params.values())

    # ------------------------------------------------------------------ bookkeeping
    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def numel(self) -> int:
        """Number of stored values."""
        return sum(p.numel() for p in self.params.values())

    def nbytes(self) -> int:
        """Bytes of the stored values."""
        return sum(p.numel() * p.element_size() for p in self.params.values())

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "opts": dict(self.opts),
                "params": dict(self.params)}

    @staticmethod
    def from_state_dict(state: dict[str, Any]) -> Structure:
        cls = STRUCTURES[state["name"]]
        return cls(state["dim"], {k: v.clone() for k, v in state["params"].items()}, **state["opts"])


class Dense(Structure):
    name = "dense"

    @classmethod
    def _layout(cls, dim, **opts):
        return {"M": (dim, dim)}

    @classmethod
    def project(cls, X, **opts):
        return cls(X.shape[0], {"M": X.clone()})

    @classmethod
    def from_symmetric(cls, S, **opts):
        return cls(S.shape[0], {"M": S})

    def to_dense(self):
        return self.params["M"]

    def compose(self, other):
        return self._new({"M": self.params["M"] @ other.params["M"]})

    def trace(self):
        return self.params["M"].diagonal().sum()


class Diagonal(Structure):
    name = "diagonal"

    @classmethod
    def _layout(cls, dim, **opts):
        return {"d": (dim,)}

    @classmethod
    def project(cls, X, **opts):
        return cls(X.shape[0], {"d": X.diagonal().clone()})

    @classmethod
    def from_inner(cls, Y, **opts):
        return cls(Y.shape[1], {"d": (Y * Y).sum(0)})

    def to_dense(self):
        return torch.diag(self.params["d"])

    def gram(self):
        return self._new({"d": self.params["d"] * self.params["d"]})

    def matmul(self, M, transpose=False):
        return self.params["d"][:, None] * M

    def compose(self, other):
        return self._new({"d": self.params["d"] * other.params["d"]})

    def trace(self):
        return self.params["d"].sum()


class BlockDiagonal(Structure):
    name = "block"

    @classmethod
    def normalize_options(cls, dim, block_size: int = 30, **opts):
        if opts:
            raise ValueError(f"structure 'block' takes only block_size, got {sorted(opts)}")
        check_positive("block_size", block_size, integer=True)
        return {"block_size": min(block_size, dim)}

    @classmethod
    def _layout(cls, dim, block_size=30, **opts):
        nb, r = divmod(dim, block_size)
        return {"blocks": (nb, block_size, block_size), "last": (r, r)}

    @classmethod
    def project(cls, X, **opts):
        dim = X.shape[0]
        opts = cls.normalize_options(dim, **opts)
        k = opts["block_size"]
        nb = dim // k
        n = nb * k
        tiles = X[:n, :n].reshape(nb, k, nb, k).permute(0, 2, 1, 3)
        idx = torch.arange(nb, device=X.device)
        return cls(dim, {"blocks": tiles[idx, idx].clone(), "last": X[n:, n:].clone()}, **opts)

    @classmethod
    def from_inner(cls, Y, **opts):
        dim = Y.shape[1]
        opts = cls.normalize_options(dim, **opts)
        k = opts["block_size"]
        nb = dim // k
        n = nb * k
        Yb = Y[:, :n].reshape(Y.shape[0], nb, k).transpose(0, 1)  # (nb, N, k)
        return cls(dim, {"blocks": Yb.transpose(1, 2) @ Yb, "last": Y[:, n:].T @ Y[:, n:]}, **opts)

    def to_dense(self):
        return torch.block_diag(*self.params["blocks"], self.params["last"])

    def matmul(self, M, transpose=False):
        blocks, last = self.params["blocks"], self.params["last"]
        if transpose:
            blocks, last = blocks.transpose(1, 2), last.T
        nb, k, _ = blocks.shape
        n = nb * k
        top = (blocks @ M[:n].reshape(nb, k, -1)).reshape(n, -1)
        return torch.cat([top, last @ M[n:]], dim=0)

    def compose(self, other):
        return self._new({"blocks": self.params["blocks"] @ other.params["blocks"],
                          "last": self.params["last"] @ other.params["last"]})

    def trace(self):
        return self.params["blocks"].diagonal(dim1=1, dim2=2).sum() + self.params["last"].trace()


class Toeplitz(Structure):
    """Lower-triangular Toeplitz: ``T[i, j] = c[i - j]`` for ``i >= j``, else 0."""

    name = "toeplitz"

    @classmethod
    def _layout(cls, dim, **opts):
        return {"c": (dim,)}

    @staticmethod
    def _lag(dim: int, device: Any) -> torch.Tensor:
        i = torch.arange(dim, device=device)
        return i[:, None] - i[None, :]

    @classmethod
    def project(cls, X, **opts):
        dim = X.shape[0]
        lag = cls._lag(dim, X.device)
        mask = lag >= 0
        sums = torch.zeros(dim, dtype=X.dtype, device=X.device).index_add_(0, lag[mask], X[mask])
        counts = torch.arange(dim, 0, -1, device=X.device).to(X.dtype)
        return cls(dim, {"c": sums / counts})

    @classmethod
    def from_symmetric(cls, S, **opts):
        P = cls.project(S)
        c = P.params["c"].clone()
        c[1:] = 2 * c[1:]  # the transposed (upper) diagonals are outside the support
        return cls(S.shape[0], {"c": c})

    def to_dense(self):
        c = self.params["c"]
        lag = self._lag(self.dim, c.device)
        return torch.where(lag >= 0, c[lag.clamp_min(0)], torch.zeros((), dtype=c.dtype, device=c.device))

    def compose(self, other):
        # first column of T1 @ T2 is T1 @ c2; the product is again lower Toeplitz
        return self._new({"c": self.to_dense() @ other.params["c"]})

    def trace(self):
        return self.dim * self.params["c"][0]

    def frob_sq(self):
        c = self.params["c"]
        weights = torch.arange(self.dim, 0, -1, device=c.device).to(c.dtype)
        return (weights * c * c).sum()


class Hierarchical(Structure):
    """``[[A, B, C], [0, D, E], [0, 0, F]]``: dense corners ``A`` (k1), ``F`` (k2), diagonal ``D``."""

    name = "hierarchical"

    @classmethod
    def normalize_options(cls, dim, k1: int = 15, k2: int = 15, **opts):
        if opts:
            raise ValueError(f"structure 'hierarchical' takes only k1, k2, got {sorted(opts)}")
        check_positive("k1", k1, integer=True, allow_zero=True)
        check_positive("k2", k2, integer=True, allow_zero=True)
        k1 = min(k1, dim)
        return {"k1": k1, "k2": min(k2, dim - k1)}

    @classmethod
    def _layout(cls, dim, k1=15, k2=15, **opts):
        m = dim - k1 - k2
        return {"A": (k1, k1), "B": (k1, m), "C": (k1, k2), "D": (m,), "E": (m, k2), "F": (k2, k2)}

    @staticmethod
    def _cuts(dim: int, k1: int, k2: int) -> tuple[slice, slice, slice]:
        return slice(0, k1), slice(k1, dim - k2), slice(dim - k2, dim)

    @classmethod
    def project(cls, X, **opts):
        return cls._from_blocks(X, 1, **opts)

    @classmethod
    def from_symmetric(cls, S, **opts):
        return cls._from_blocks(S, 2, **opts)

    @classmethod
    def _from_blocks(cls, X, off, **opts):
        dim = X.shape[0]
        opts = cls.normalize_options(dim, **opts)
        s1, s2, s3 = cls._cuts(dim, opts["k1"], opts["k2"])
        params = {"A": X[s1, s1].clone(), "B": off * X[s1, s2], "C": off * X[s1, s3],
                  "D": X[s2, s2].diagonal().clone(), "E": off * X[s2, s3], "F": X[s3, s3].clone()}
        return cls(dim, params, **opts)

    def to_dense(self):
        p = self.params
        out = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        s1, s2, s3 = self._cuts(self.dim, self.opts["k1"], self.opts["k2"])
        out[s1, s1], out[s1, s2], out[s1, s3] = p["A"], p["B"], p["C"]
        out[s2, s2] = torch.diag(p["D"])
        out[s2, s3], out[s3, s3] = p["E"], p["F"]
        return out

    def matmul(self, M, transpose=False):
        p = self.params
        s1, s2, s3 = self._cuts(self.dim, self.opts["k1"], self.opts["k2"])
        M1, M2, M3 = M[s1], M[s2], M[s3]
        D = p["D"][:, None]
        if not transpose:
            top = p["A"] @ M1 + p["B"] @ M2 + p["C"] @ M3
            mid = D * M2 + p["E"] @ M3
            bot = p["F"] @ M3
        else:
            top = p["A"].T @ M1
            mid = p["B"].T @ M1 + D * M2
            bot = p["C"].T @ M1 + p["E"].T @ M2 + p["F"].T @ M3
        return torch.cat([top, mid, bot], dim=0)

    def compose(self, other):
        a, b = self.params, other.params
        return self._new({
            "A": a["A"] @ b["A"],
            "B": a["A"] @ b["B"] + a["B"] * b["D"],
            "C": a["A"] @ b["C"] + a["B"] @ b["E"] + a["C"] @ b["F"],
            "D": a["D"] * b["D"],
            "E": a["D"][:, None] * b["E"] + a["E"] @ b["F"],
            "F": a["F"] @ b["F"],
        })

    def trace(self):
        p = self.params
        return p["A"].diagonal().sum() + p["D"].sum() + p["F"].diagonal().sum()


class LowRank(Structure):
    """``[[A, 0], [B, D]]`` (``A``: rank x rank, ``D`` diagonal): the transpose of a hierarchical
    matrix with ``k1 = rank``, ``k2 = 0``, stored as that hierarchical matrix's parameters."""

    name = "lowrank"

    @classmethod
    def normalize_options(cls, dim, rank: int = 16, **opts):
        if opts:
            raise ValueError(f"structure 'lowrank' takes only rank, got {sorted(opts)}")
        check_positive("rank", rank, integer=True)
        return {"rank": min(rank, dim)}

    @classmethod
    def _layout(cls, dim, rank=16, **opts):
        return Hierarchical._layout(dim, k1=rank, k2=0)

    def _h(self) -> Hierarchical:
        return Hierarchical(self.dim, self.params, k1=self.opts["rank"], k2=0)

    @classmethod
    def _wrap(cls, h: Structure, opts: dict[str, Any]) -> LowRank:
        return cls(h.dim, h.params, **opts)

    @classmethod
    def project(cls, X, **opts):
        opts = cls.normalize_options(X.shape[0], **opts)
        return cls._wrap(Hierarchical.project(X.T, k1=opts["rank"], k2=0), opts)

    @classmethod
    def from_symmetric(cls, S, **opts):
        opts = cls.normalize_options(S.shape[0], **opts)
        return cls._wrap(Hierarchical.from_symmetric(S, k1=opts["rank"], k2=0), opts)

    def to_dense(self):
        return self._h().to_dense().T

    def matmul(self, M, transpose=False):
        return self._h().matmul(M, transpose=not transpose)

    def compose(self, other):
        # (H1^T)(H2^T) = (H2 H1)^T
        return self._wrap(other._h().compose(self._h()), self.opts)

    def trace(self):
        return self._h().trace()


STRUCTURES: dict[str, type[Structure]] = {
    cls.name: cls for cls in (Dense, Diagonal, BlockDiagonal, Hierarchical, Toeplitz, LowRank)
}


def get_structure(name: str) -> type[Structure]:
    """The structure class called ``name`` (one of :data:`STRUCTURES`)."""
    return STRUCTURES[check_choice("structure", name, STRUCTURES)]
