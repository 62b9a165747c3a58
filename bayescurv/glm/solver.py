r"""The probabilistic linear solver inside each Newton step (IterGP on the whitened system).

A Newton step of the Laplace approximation solves, with :math:`S S^\top = W` (block-diagonal),

.. math:: A v = z, \qquad A = I + S^\top K S, \qquad z = S^\top (f - m) + u,\ S u = g,

and sets :math:`a = S v`, :math:`f \leftarrow m + K a` (Rasmussen & Williams, Alg. 3.1/3.3:
:math:`a = b - S A^{-1} S^\top K b` with :math:`b = W(f - m) + g = S z`). :math:`A \succeq I` is
well conditioned and stays defined when :math:`W` is singular (softmax).

The solver keeps actions as :math:`A`-orthonormal directions :math:`D` (:math:`D^\top A D = I`)
spanning the actions :math:`s_1, \dots, s_j` chosen by a policy, so that

.. math:: C_j = S_j (S_j^\top A S_j)^{-1} S_j^\top = D D^\top \preceq A^{-1}

(:math:`A^{1/2} C_j A^{1/2}` is an orthogonal projection), with equality when the actions span
:math:`\mathbb R^{NC}`. Since :math:`S C_j S^\top = Q (Q^\top \hat K Q)^{-1} Q^\top` with
:math:`Q = S S_j` and :math:`\hat K = K + W^{-1}` (for invertible :math:`W`), this is IterGP's
:math:`C_j` for the GP regression with pseudo-targets, actions :math:`Q`.

Stopping: a solve stops when the *mean* residual :math:`\|z - A C z\| \le` ``rtol`` :math:`\|z\|`.
That says nothing about the covariance :math:`C`: after recycling, the residual of :math:`z`
can be small while :math:`C` misses most of :math:`A^{-1}`. At the returned mode
:func:`refine` therefore continues with block CG on ``k`` probe vectors
:math:`W = (A - I)\Omega = S^\top K S \Omega` (:math:`\Omega` Gaussian: weighted like the
kernel rows :math:`S^\top k(X, x)` that the covariance is applied to; fresh probes when they
have converged) until the trace of :math:`A - I` outside the action space,
:math:`\tau` (:func:`trace_gap`, free: :math:`\operatorname{tr}(A - I) =
\sum_n \operatorname{tr}(S_n^\top K_{nn} S_n)`), is at most ``rtol`` times
:math:`\max(1, \operatorname{tr}(A - I))`. :math:`\tau` bounds the error of the projected
:math:`\log\det A` of the evidence (:math:`0 \le \log\det A - \log\det_{proj} \le \tau`).
Its actions are the probe residuals (block CG), within the same ``max_actions`` budget; with
``max_actions`` :math:`\ge NC` and ``tol = 0`` it runs until :math:`\tau` is at rounding level
or the directions stop being independent: the exact Laplace to ``1e-8`` or better (tested
against Cholesky in mean, covariance and evidence).

Recycling: for a new :math:`A'` the old directions are re-orthonormalized in one batched
product :math:`A' D`; compression keeps the ``r`` leading left singular directions of
:math:`D`, i.e. the top-``r`` eigenpairs of :math:`C_j` (so :math:`C_r \preceq C_j`: variances
never decrease below their uncompressed value).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError

POLICIES = ("cg", "pcg", "unit", "random")

MatMul = Callable[[Tensor], Tensor]


class ActionState:
    """``A``-orthonormal directions ``D`` ``(M, j)`` and ``A D``; ``C = D Dᵀ``."""

    def __init__(self, M: int, dtype: torch.dtype, device: torch.device) -> None:
        self.D = torch.zeros(M, 0, dtype=dtype, device=device)
        self.AD = torch.zeros(M, 0, dtype=dtype, device=device)

    @property
    def rank(self) -> int:
        return self.D.shape[1]

    def apply_C(self, V: Tensor) -> Tensor:
        return self.D @ (self.D.T @ V)

    def residual(self, z: Tensor) -> Tensor:
        """``z - A C z`` without new products."""
        return z - self.AD @ (self.D.T @ z)

    def project_out(self, S: Tensor) -> Tensor:
        """``S`` made ``A``-orthogonal to the held directions (twice), columns normalized. Done
        *before* the product ``A S``, so that ``add`` does not form ``A S`` as a difference
        of nearly equal products (which loses ``A``-orthonormality near convergence)."""
        for _ in range(2):
            S = S - self.D @ (self.AD.T @ S)
        return S / S.norm(dim=0).clamp_min(torch.finfo(S.dtype).tiny)

    def add(self, S: Tensor, AS: Tensor, drop_tol: float = 1e-10) -> int:
        """Append actions ``S`` ``(M, k)`` with their products ``A S``; returns how many
        independent directions were added (``A``-Gram-Schmidt twice, then an eigen-basis of
        the remaining Gram matrix, dropping directions with relative energy < ``drop_tol``)."""
        scale = (S * AS).sum(0).clamp_min(torch.finfo(S.dtype).tiny)
        for _ in range(2):
            c = self.AD.T @ S
            S, AS = S - self.D @ c, AS - self.AD @ c
        G = S.T @ AS
        G = 0.5 * (G + G.T)
        evals, evecs = torch.linalg.eigh(G)
        keep = evals > drop_tol * scale.max()
        if not bool(keep.any()):
            return 0
        T = evecs[:, keep] / evals[keep].sqrt()
        self.D = torch.cat([self.D, S @ T], 1)
        self.AD = torch.cat([self.AD, AS @ T], 1)
        return int(keep.sum())

    def recycle(self, matmul: MatMul) -> int:
        """Re-orthonormalize the current directions for a new ``A`` (one batched product);
        returns the number of products."""
        D = self.D
        self.D, self.AD = D[:, :0], self.AD[:, :0]
        if D.shape[1] == 0:
            return 0
        self.add(D, matmul(D))
        return D.shape[1]

    def compress(self, rank: int) -> None:
        """Keep the ``rank`` leading eigen-directions of ``C = D Dᵀ`` (``C_r ⪯ C``)."""
        if self.rank <= rank:
            return
        evals, evecs = torch.linalg.eigh(self.D.T @ self.D)
        V = evecs[:, -rank:]
        self.D, self.AD = self.D @ V, self.AD @ V


class DenseState:
    """The exact reference: ``A = L Lᵀ`` (Cholesky), ``C = A⁻¹``, ``D = L⁻ᵀ``."""

    def __init__(self, A: Tensor) -> None:
        from bayescurv.linalg.base import jittered_cholesky

        self.L = jittered_cholesky(A)

    @property
    def rank(self) -> int:
        return self.L.shape[0]

    def apply_C(self, V: Tensor) -> Tensor:
        return torch.cholesky_solve(V, self.L)

    def project(self, V: Tensor) -> Tensor:
        """``Dᵀ V = L⁻¹ V``."""
        return torch.linalg.solve_triangular(self.L, V, upper=False)

    def residual(self, z: Tensor) -> Tensor:
        return torch.zeros_like(z)


class Policy:
    """Chooses the next actions.

    Args:
        name: ``"cg"`` (the residual :math:`r = z - A C z`: conjugate gradients; the actions
            span Krylov spaces), ``"pcg"`` (the preconditioned residual :math:`P^{-1} r`),
            ``"unit"`` (unit vectors of the data points in a random order: a growing data
            subset, all ``C`` outputs of a point together), ``"random"`` (Gaussian vectors).
        block: actions per step for ``"unit"`` (data points) and ``"random"``.
        preconditioner: for ``"pcg"``: ``r -> P⁻¹ r`` on ``(M, 1)`` columns.
    """

    def __init__(self, name: str, num_data: int, num_outputs: int, block: int = 1,
                 preconditioner: MatMul | None = None,
                 generator: torch.Generator | None = None) -> None:
        if name not in POLICIES:
            raise InvalidArgumentError(f"unknown policy {name!r}; use one of {POLICIES}")
        self.name, self.N, self.C, self.block = name, num_data, num_outputs, max(1, block)
        self.preconditioner = preconditioner
        self.generator = generator
        self.order: Tensor | None = None
        self.pos = 0

    def restart(self) -> None:
        """A new solve: unit actions start over (a recycled subset is revisited harmlessly:
        dependent directions are dropped)."""
        self.pos = 0

    def __call__(self, r: Tensor) -> Tensor | None:
        M = r.shape[0]
        if self.name == "cg":
            return r / r.norm()
        if self.name == "pcg":
            if self.preconditioner is None:
                raise InvalidArgumentError("policy 'pcg' needs a preconditioner")
            s = self.preconditioner(r)
            return s / s.norm()
        if self.name == "random":
            return torch.randn(M, self.block, generator=self.generator, dtype=r.dtype,
                               device="cpu").to(r.device)
        if self.order is None:
            self.order = torch.randperm(self.N, generator=self.generator).to(r.device)
        if self.pos >= self.N:
            return None
        pts = self.order[self.pos:self.pos + self.block]
        self.pos += pts.numel()
        idx = (pts.unsqueeze(-1) * self.C + torch.arange(self.C, device=r.device)).reshape(-1)
        S = torch.zeros(M, idx.numel(), dtype=r.dtype, device=r.device)
        S[idx, torch.arange(idx.numel(), device=r.device)] = 1.0
        return S


def solve(matmul: MatMul, z: Tensor, state: ActionState, policy: Policy, max_actions: int,
          rtol: float, rank: int | None = None, bar=None) -> int:
    """Add actions until ``‖z - A C z‖ ≤ rtol ‖z‖``, or ``max_actions`` directions are held,
    or ``max_actions`` new products were spent (with compression); returns the products."""
    products = 0
    policy.restart()
    target = rtol * float(z.norm())
    if policy.name in ("cg", "pcg"):  # past this the residual is rounding noise
        target = max(target, 1e3 * torch.finfo(z.dtype).eps * float(z.norm()))
    r = state.residual(z)
    while state.rank < max_actions and products < max_actions and float(r.norm()) > target:
        S = policy(r)
        if S is None:
            break
        S = S[:, : max_actions - state.rank]
        if policy.name != "unit":  # unit actions stay sparse (a data subset)
            S = state.project_out(S)
        AS = matmul(S)
        products += S.shape[1]
        added = state.add(S, AS)
        if bar is not None:
            bar.update(S.shape[1])
        if added == 0 and policy.name in ("cg", "pcg"):
            break
        if rank is not None and state.rank > rank:
            state.compress(rank)
        r = state.residual(z)
    return products


def trace_gap(state: ActionState, trace: float) -> float:
    r""":math:`\tau = \operatorname{tr}(A - I) - \operatorname{tr}(Q^\top (A - I) Q)` for an
    orthonormal basis :math:`Q` of the actions (:math:`Q^\top A Q = (D^\top D)^{-1}` since
    :math:`D^\top A D = I`): the trace of :math:`A - I` outside the action space, and a bound
    :math:`0 \le \log\det A - \log\det Q^\top A Q \le \tau` on the projected log
    determinant (interlacing; :math:`\log\det B \le \operatorname{tr}(B - I)`)."""
    if state.rank == 0:
        return trace
    G = state.D.T @ state.D
    inv_tr = float(torch.cholesky_inverse(torch.linalg.cholesky(G)).diagonal().sum())
    return max(0.0, trace - (inv_tr - state.rank))


def refine(matmul: MatMul, state: ActionState, max_actions: int, rtol: float, trace: float,
           generator: torch.Generator, probes: int = 8, bar=None) -> tuple[int, float]:
    r"""The covariance part of the stopping rule (module docstring): block CG on ``probes``
    vectors :math:`(A - I)\Omega` (fresh ones when those have converged) until
    :func:`trace_gap` ``≤ rtol · max(1, trace)`` (``trace`` :math:`= \operatorname{tr}(A - I)`;
    floor ``1e3 eps``), or ``max_actions`` directions are held, or ``max_actions`` products
    were spent; returns the products and the final gap."""
    M = state.D.shape[0]
    dev, dt = state.D.device, state.D.dtype
    floor = 1e3 * torch.finfo(dt).eps
    goal = max(rtol, floor) * max(1.0, trace)
    products, W, R = 0, None, None
    gap = trace_gap(state, trace)
    while gap > goal and state.rank < max_actions and products < max_actions:
        if R is None or not bool((R.norm(dim=0) > floor * W.norm(dim=0)).any()):
            Om = torch.randn(M, min(probes, M), generator=generator, dtype=dt).to(dev)
            W = matmul(Om) - Om  # (A - I) Ω = Sᵀ K S Ω: weighted like the kernel rows
            products += W.shape[1]
            R = state.residual(W)
        S = R[:, R.norm(dim=0) > floor * W.norm(dim=0)][:, : max_actions - state.rank]
        if S.shape[1] == 0:
            R = None
            continue
        S = state.project_out(S)
        AS = matmul(S)
        products += S.shape[1]
        if bar is not None:
            bar.update(S.shape[1])
        if state.add(S, AS) == 0:
            break
        R = state.residual(W)
        gap = trace_gap(state, trace)
    return products, gap
