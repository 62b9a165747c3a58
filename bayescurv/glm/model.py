r"""IterGLM: Laplace inference for GLMs and non-conjugate GPs with a probabilistic linear solver.

Model: latent :math:`f \sim GP(m, K)` (``(N, C)``, flattened row-major), observations
:math:`y_n \sim p(y_n | f_n + o_n)` with an offset :math:`o` (log exposure for Poisson). The
Laplace approximation is found by Newton's method; each step is a GP regression solved by
:mod:`bayescurv.glm.solver` (see there for the whitened system :math:`A = I + S^\top K S`).
After convergence at :math:`\hat f = m + K a`, with the solver's :math:`C \preceq A^{-1}`,

.. math::
    \mu(x) = m(x) + k(x, X)\,a, \qquad
    \Sigma(x, x') = k(x, x') - k(x, X)\, S C S^\top k(X, x'),

the **combined** covariance: the exact Laplace covariance
:math:`k - k_{xX} S A^{-1} S^\top k_{Xx}` plus the computational part
:math:`k_{xX} S (A^{-1} - C) S^\top k_{Xx} \succeq 0`, which vanishes when the actions span
:math:`\mathbb R^{NC}`. The bound "combined :math:`\succeq` exact" holds at the *same* curvature
:math:`W = S S^\top` (the sites at the returned iterate). It is not a bound on the Laplace
covariance at the MAP when Newton has not converged: there :math:`W(\hat f_{MAP})` differs (a
Poisson fit with 2 actions ends far from the MAP, where :math:`W = e^{f}` is larger, and its
covariance is below the MAP's; ``converged`` and a
:class:`~bayescurv.errors.ConvergenceWarning` say when that can happen).

Newton: a step is halved (at most 20 times) until the objective does not decrease; if it still
decreases, the step is rejected and the fit stops, unconverged. ``converged``,
``newton_steps`` and ``grad_norm`` (:math:`\|\nabla_f\Psi\| = \|\nabla\log p(y|f) - a\|`)
report the outcome; ``trace_gap`` the covariance stopping rule's :math:`\tau`
(:func:`~bayescurv.glm.solver.trace_gap`).

``predict`` reports an upper bound on the computational variance,
:math:`u^\top (A^{-1} - C) u = r^\top A^{-1} r \le \|r\|^2` with :math:`u = S^\top k(X, x)`,
:math:`r = u - A C u` (since :math:`A \succeq I`), free of new products with :math:`K`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.errors import (
    ConvergenceWarning,
    InvalidArgumentError,
    NonFiniteError,
    NotFittedError,
    ShapeError,
)
from bayescurv.glm import likelihoods as glik
from bayescurv.glm.evidence import EvidenceMixin
from bayescurv.glm.kernels import EmpiricalNTK, FeatureKernel, GLMKernel, as_kernel
from bayescurv.glm.solver import POLICIES, ActionState, DenseState, Policy, refine, solve
from bayescurv.glm.summary import CoefficientsMixin
from bayescurv.likelihoods import Bernoulli, Categorical, Likelihood

SOLVERS = ("iterative", "cholesky")


@dataclass
class GLMPrediction:
    """Latent predictive at ``B`` points: ``mean`` ``(B, C)`` (offset included),
    ``covariance`` ``(B, C, C)`` (combined: mathematical + computational) and
    ``computational`` ``(B, C)``, an upper bound on the computational part of the variance
    (zero for ``solver="cholesky"``)."""

    mean: Tensor
    covariance: Tensor
    computational: Tensor

    @property
    def variance(self) -> Tensor:
        """Total (combined) latent variance ``(B, C)``."""
        return torch.diagonal(self.covariance, dim1=-2, dim2=-1)


class IterGLM(CoefficientsMixin, EvidenceMixin):
    r"""Bayesian GLM / non-conjugate GP by Laplace-Newton with a probabilistic linear solver.

    Args:
        likelihood: ``"binary"`` (Bernoulli/logistic), ``"binomial"`` (targets
            ``(N, 2)`` = successes, failures), ``"poisson"``, ``"classification"``
            (softmax), ``"regression"`` (Gaussian) or a likelihood object.
        kernel: a GPyTorch kernel or callable, a ``linear_operator`` over an index set, a
            fitted :class:`~bayescurv.Laplace` (empirical NTK), ``"features"`` (the inputs are
            the design matrix, prior precision 1) or a :class:`~bayescurv.glm.kernels.GLMKernel`.
        solver: ``"iterative"`` (the probabilistic solver) or ``"cholesky"`` (exact
            reference; in weight space for feature kernels with ``D <= N``).
        policy: ``"cg"``, ``"pcg"`` (preconditioned CG actions), ``"unit"`` (data subsets),
            ``"random"``.
        max_actions: directions held (and new products) per Newton step (default ``N C``).
        tol: relative residual at which a solve stops.
        rank: compress the actions to at most this rank (bounded memory).
        recycle: reuse the previous Newton step's actions.
        block: actions per step for ``"unit"`` (data points) and ``"random"``.
        preconditioner: for ``"pcg"``: ``"jacobi"`` (diagonal of :math:`A`),
            ``"laplace"`` (for an :class:`EmpiricalNTK` kernel: Woodbury with the Laplace's own
            structured posterior precision, e.g. K-FAC or diagonal), or a callable on
            ``(N C, k)`` columns.
        max_newton: Newton iterations (at most).
        newton_tol: relative change of the objective at which the Newton iterations stop.
        num_classes: number of classes for ``"classification"`` (default ``max(y) + 1``).
        sigma_noise: Gaussian observation noise.
        progress: show a tqdm bar over the solver's products.
        seed: seed of the ``"unit"``/``"random"`` policies.
    """

    def __init__(self, likelihood: str | Likelihood = "binary", kernel=None, *,
                 solver: str = "iterative", policy: str = "cg", max_actions: int | None = None,
                 tol: float = 1e-10, rank: int | None = None, recycle: bool = True,
                 block: int = 1, preconditioner="jacobi", max_newton: int = 100,
                 newton_tol: float = 1e-12, num_classes: int | None = None,
                 sigma_noise: float = 1.0, progress: bool = False, seed: int = 0) -> None:
        if solver not in SOLVERS:
            raise InvalidArgumentError(f"unknown solver {solver!r}; use one of {SOLVERS}")
        if policy not in POLICIES:
            raise InvalidArgumentError(f"unknown policy {policy!r}; use one of {POLICIES}")
        for name, v in (("max_actions", max_actions), ("rank", rank)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise InvalidArgumentError(f"{name} must be a positive int or None, got {v}")
        for name, v in (("block", block), ("max_newton", max_newton)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidArgumentError(f"{name} must be a positive int, got {v!r}")
        for name, v in (("tol", tol), ("newton_tol", newton_tol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(
                    v) or v < 0:
                raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {v!r}")
        self.likelihood = glik.resolve(likelihood, sigma_noise)
        self.kernel: GLMKernel = as_kernel(kernel)
        self.solver, self.policy = solver, policy
        self.max_actions, self.tol, self.rank = max_actions, tol, rank
        self.recycle, self.block, self.preconditioner = recycle, block, preconditioner
        self.max_newton, self.newton_tol = max_newton, newton_tol
        self.num_classes, self.progress, self.seed = num_classes, progress, seed
        self.num_products = 0  # columns multiplied by A (recycled ones included) or K
        self.num_actions = 0  # new actions chosen by the policy (sequential solver steps)
        self.history: list[dict] = []
        self._fitted = False

    # ------------------------------------------------------------------------------------
    # input handling
    # ------------------------------------------------------------------------------------
    def _dtype(self, X: Tensor) -> torch.dtype:
        if X.is_floating_point():
            return X.dtype
        op = getattr(self.kernel, "operator", None)
        return op.dtype if op is not None else torch.get_default_dtype()

    def _offset(self, offset, exposure, N: int, C: int, like: Tensor) -> Tensor:
        if offset is not None and exposure is not None:
            raise InvalidArgumentError("pass offset or exposure, not both")
        if exposure is not None:
            exposure = torch.as_tensor(exposure, dtype=like.dtype, device=like.device)
            if (exposure <= 0).any():
                raise InvalidArgumentError("exposure must be positive")
            offset = torch.log(exposure)
        if offset is None:
            return torch.zeros(N, C, dtype=like.dtype, device=like.device)
        o = torch.as_tensor(offset, dtype=like.dtype, device=like.device)
        if o.dim() == 1:
            o = o.unsqueeze(-1)
        if o.dim() != 2 or o.shape[0] != N or o.shape[1] not in (1, C):
            raise ShapeError(f"offset must be (N,) or (N, C) = ({N}, {C}); got {tuple(o.shape)}")
        if not torch.isfinite(o).all():
            raise NonFiniteError("offset holds NaN or Inf")
        return o.expand(N, C)

    def _check_X(self, X) -> Tensor:
        if not torch.is_tensor(X):
            X = torch.as_tensor(X)
        if X.dim() == 0 or X.shape[0] == 0:
            from bayescurv.errors import EmptyDataError

            raise EmptyDataError("X must hold at least one data point")
        if X.is_floating_point() and not torch.isfinite(X).all():
            raise NonFiniteError("X holds NaN or Inf")
        return X

    def check_fitted(self) -> None:
        """Raise :class:`~bayescurv.errors.NotFittedError` unless :meth:`fit` has run (as
        :meth:`bayescurv.Laplace.check_fitted`)."""
        if not self._fitted:
            raise NotFittedError("call fit(X, y) first")

    # ------------------------------------------------------------------------------------
    # the whitened operator A = I + Sᵀ K S
    # ------------------------------------------------------------------------------------
    @staticmethod
    def _S(S: Tensor, V: Tensor) -> Tensor:  # (N,C,C) x (N*C, k) -> (N, C, k)
        return torch.einsum("ncd,ndk->nck", S, V.reshape(S.shape[0], S.shape[2], -1))

    @staticmethod
    def _St(S: Tensor, V: Tensor) -> Tensor:  # Sᵀ: (N, C, k) -> (N*C, k)
        return torch.einsum("ndc,ndk->nck", S, V).reshape(-1, V.shape[-1])

    @staticmethod
    def _support(V: Tensor) -> Tensor | None:
        """Rows (data points) where ``V`` ``(N, C, k)`` is non-zero, or ``None`` when that is
        more than a quarter of them (then a dense product is cheaper)."""
        rows = V.reshape(V.shape[0], -1).ne(0).any(1).nonzero().squeeze(-1)
        return rows if rows.numel() <= V.shape[0] // 4 else None

    def _Kmv(self, K_mv, V: Tensor) -> Tensor:
        """``K V`` for ``V`` ``(N, C, k)``. If ``V`` lives on a few data points (unit actions,
        directions recycled from them, the weights ``a`` of a subset solve), only those
        points' kernel columns are used: a gather from a cached matrix, else ``K(X, X[rows])``
        products (``N · |rows|`` kernel evaluations, or JVP/VJPs on those points for the
        NTK), never a dense one-hot product."""
        rows = self._support(V)
        if rows is None:
            return K_mv(V)
        cols = getattr(K_mv, "columns", None)
        if cols is None:  # kernel evaluations against the few points only (any kernel)
            return self.kernel.matmul(self.X_, self.X_[rows], V[rows], self.C_)
        N, C, k = V.shape
        return (cols(rows) @ V[rows].reshape(rows.numel(), C * k)).reshape(N, C, k)

    def _A(self, K_mv, S: Tensor):
        def matmul(V: Tensor) -> Tensor:
            self.num_products += V.shape[1]
            return V + self._St(S, self._Kmv(K_mv, self._S(S, V)))

        return matmul

    def _dense_A(self, Kd: Tensor, S: Tensor) -> Tensor:
        N, C = S.shape[0], S.shape[1]
        Sb = torch.block_diag(*S) if N * C <= 4096 else None
        if Sb is None:  # Sᵀ K S blockwise without forming the block-diagonal S
            K4 = Kd.reshape(N, C, N, C)
            SKS = torch.einsum("nca,ncmd,mdb->namb", S, K4, S).reshape(N * C, N * C)
        else:
            SKS = Sb.T @ Kd @ Sb
        return torch.eye(N * C, dtype=Kd.dtype, device=Kd.device) + SKS

    def _make_preconditioner(self, S: Tensor):
        pc = self.preconditioner
        if callable(pc):
            return pc
        if pc == "jacobi":
            prior = self.kernel.diag(self.X_, self.C_)
            d = 1.0 + torch.einsum("nca,ncd,nda->na", S, prior, S).reshape(-1, 1)
            return lambda r: r / d
        if pc == "laplace":
            if not isinstance(self.kernel, EmpiricalNTK):
                raise InvalidArgumentError("preconditioner='laplace' needs an EmpiricalNTK kernel")
            return self._laplace_preconditioner(S)
        raise InvalidArgumentError(
            f"unknown preconditioner {pc!r}; use 'jacobi', 'laplace' or a callable")

    def _laplace_preconditioner(self, S: Tensor):
        r""":math:`A^{-1} = I - S^\top J (\Lambda_0 + J^\top W J)^{-1} J^\top S` (Woodbury) with the
        Laplace's structured posterior precision in place of :math:`\Lambda_0 + J^\top W J`."""
        from bayescurv.curvature.matfree import jacobian_vector_product, vector_jacobian_product

        ker, X = self.kernel, self.kernel.as_input(self.X_)
        prec = ker.laplace.posterior_precision
        model, ps = ker.params.model, ker.params

        def apply(r: Tensor) -> Tensor:
            V = self._S(S, r)
            U = sum(vector_jacobian_product(model, ps, x, v)
                    for x, v in zip(X.split(ker.block_size), V.split(ker.block_size)))
            U = prec.solve(U)
            JU = torch.cat([jacobian_vector_product(model, ps, x, U)
                            for x in X.split(ker.block_size)])
            return r - self._St(S, JU)

        return apply

    # ------------------------------------------------------------------------------------
    # fitting
    # ------------------------------------------------------------------------------------
    def fit(self, X, y, offset=None, *, exposure=None) -> IterGLM:
        """Find the Laplace approximation. ``offset`` ``(N,)``/``(N, C)`` is added to the
        latent (``exposure`` ``e`` means ``offset = log e``)."""
        X = self._check_X(X)
        y = torch.as_tensor(y)
        if y.dim() == 0 or y.shape[0] != X.shape[0]:
            raise ShapeError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
        dtype = self._dtype(X)
        if y.is_floating_point():
            if not torch.isfinite(y).all():
                raise NonFiniteError("y holds NaN or Inf; clean or impute the targets first")
            y = y.to(dtype)
        C = glik.num_latent(self.likelihood, y, self.num_classes)
        if self.kernel.num_outputs is not None and self.kernel.num_outputs != C:
            raise ShapeError(f"the kernel has {self.kernel.num_outputs} outputs, the "
                             f"likelihood needs {C}")
        N = X.shape[0]
        like = torch.empty(0, dtype=dtype, device=X.device)
        self.X_, self.y_, self.C_, self.N_ = X, y, C, N
        self.offset_ = self._offset(offset, exposure, N, C, like)
        self.likelihood.check(torch.zeros(N, C, dtype=dtype, device=X.device), y)
        self.num_products = 0
        self.num_actions = 0
        self.history = []
        with torch.no_grad():
            if self._weight_space():
                self._fit_weights()
            else:
                self._fit_function()
        self._fitted = True
        return self

    def _weight_space(self) -> bool:
        if self.solver != "cholesky" or not isinstance(self.kernel, FeatureKernel):
            return False
        phi = self.kernel.features(self.X_)
        return phi.shape[1] <= phi.shape[0]

    def _psi(self, f: Tensor, a: Tensor, m: Tensor, rows: Tensor | None = None) -> Tensor:
        r""":math:`\Psi = \log p(y|f + o) - \tfrac12 a^\top (f - m)`, the Newton objective;
        with ``rows``, the likelihood of those data points only."""
        if rows is None:
            ll = self.likelihood.log_prob(f + self.offset_, self.y_)
        else:
            ll = self.likelihood.log_prob(f[rows] + self.offset_[rows], self.y_[rows])
        return ll.sum() - 0.5 * (a * (f - m)).sum()

    def _fit_function(self) -> None:
        X, C, N = self.X_, self.C_, self.N_
        M = N * C
        m = self.kernel.mean(X, C).detach()
        K_mv = self.kernel.train(X, C)
        gen = torch.Generator().manual_seed(self.seed)
        policy = Policy(self.policy, N, C, self.block, None, gen)
        max_actions = M if self.max_actions is None else min(self.max_actions, M)
        f, a = m.clone(), torch.zeros_like(m)
        psi = self._psi(f, a, m)
        state = None
        bar = None
        if self.progress and self.solver == "iterative":
            from tqdm.auto import tqdm

            bar = tqdm(desc="IterGLM products", leave=False)
        Kd = self.kernel.dense(X, X, C) if self.solver == "cholesky" else None
        converged, stop = False, f"max_newton={self.max_newton} steps"
        for it in range(self.max_newton + 1):
            S, u = glik.sites(self.likelihood, f + self.offset_, self.y_)
            z = self._St(S, (f - m).unsqueeze(-1)) + u.reshape(-1, 1)
            if self.solver == "cholesky":
                state = DenseState(self._dense_A(Kd, S))
            else:
                A = self._A(K_mv, S)
                if state is None or not self.recycle:
                    state = ActionState(M, z.dtype, z.device)
                else:
                    if self.rank is not None:
                        state.compress(self.rank)
                    state.recycle(A)
                if self.policy == "pcg":
                    policy.preconditioner = self._make_preconditioner(S)
                new = solve(A, z, state, policy, max_actions, self.tol, self.rank, bar)
                self.num_actions += new
            if it == self.max_newton:
                break  # the final state belongs to the returned mode
            a_new = self._S(S, state.apply_C(z)).squeeze(-1)
            f_new = m + self._K(K_mv, Kd, a_new)
            # The projected step only sees the sites of the points its actions touch (C is
            # zero elsewhere): for unit actions, a data subset. Its fixed point is the mode of
            # that subset's objective, so the step is damped on that objective; on the full
            # one the subset step need not be an ascent direction, and halving would stall.
            rows = None if self.solver == "cholesky" else self._support(
                state.D.reshape(N, C, -1))
            psi = self._psi(f, a, m, rows)
            psi_new, step = self._line_search(f, a, f_new, a_new, m, rows, psi, 20)
            if psi_new is None:  # no halving of the step increases the objective: stop here
                stop = "the line search found no ascent (20 halvings)"
                break  # the state still belongs to f, the returned iterate
            f_new, a_new = step
            change = abs(float(psi_new - psi))
            self.history.append({"psi": float(psi_new), "rank": state.rank,
                                 "products": self.num_products, "actions": self.num_actions,
                                 "halvings": self._halvings})
            f, a, psi = f_new, a_new, psi_new
            if change <= self.newton_tol * (1.0 + abs(float(psi))):
                converged = True
                # recompute the sites (and the solver state) at the returned mode
                S, u = glik.sites(self.likelihood, f + self.offset_, self.y_)
                if self.solver == "cholesky":
                    state = DenseState(self._dense_A(Kd, S))
                else:
                    state.recycle(self._A(K_mv, S))
                break
        self.trace_gap = None
        if (self.solver != "cholesky" and self.rank is None and self.policy != "unit"
                and state.rank < max_actions):  # the covariance part of the stopping rule
            trace = float(torch.einsum("nca,ncd,nda->", S, self.kernel.diag(X, C).to(S), S))
            new, self.trace_gap = refine(self._A(K_mv, S), state, max_actions, self.tol, trace,
                                         gen, bar=bar)
            self.num_actions += new
        if bar is not None:
            bar.close()
        grad = -self.likelihood.gradient(f + self.offset_, self.y_) - a  # ∇Ψ(f), f - m = K a
        self._report(converged, len(self.history), float(grad.norm()), stop)
        self.m_, self.f_, self.a_, self.S_, self.state_ = m, f, a, S, state

    def _line_search(self, f, a, f_new, a_new, m, rows, psi, max_halvings: int):
        """Halve the step until the objective does not decrease; ``(None, None)`` when it
        still decreases after ``max_halvings`` (the step is rejected, never accepted)."""
        floor = psi - 1e-12 * abs(float(psi))
        psi_new, halvings = self._psi(f_new, a_new, m, rows), 0
        while psi_new < floor and halvings < max_halvings:
            a_new, f_new = 0.5 * (a + a_new), 0.5 * (f + f_new)
            psi_new, halvings = self._psi(f_new, a_new, m, rows), halvings + 1
        self._halvings = halvings
        if psi_new < floor:
            return None, None
        return psi_new, (f_new, a_new)

    def _report(self, converged: bool, steps: int, grad_norm: float, stop: str) -> None:
        """Set ``converged``, ``newton_steps``, ``grad_norm``; warn when not converged."""
        self.converged, self.newton_steps, self.grad_norm = converged, steps, grad_norm
        if not converged:
            hint = "" if self.solver == "cholesky" else (
                f" The projected steps of the iterative solver (max_actions="
                f"{self.max_actions}) need not reach the mode: raise max_actions.")
            warnings.warn(
                f"IterGLM: Newton's method did not converge: {stop} after {steps} steps, "
                f"gradient norm {grad_norm:.3g} (newton_tol={self.newton_tol}).{hint}",
                ConvergenceWarning, stacklevel=4)

    def _K(self, K_mv, Kd, a: Tensor) -> Tensor:
        if Kd is not None:
            return (Kd @ a.reshape(-1)).reshape(a.shape)
        self.num_products += 1
        return self._Kmv(K_mv, a.unsqueeze(-1)).squeeze(-1)

    # weight space (exact, classical IRLS) -----------------------------------------------
    def _weight_prior(self, D: int, like: Tensor, C: int) -> Tensor:
        p = self.kernel.prior_precision.to(dtype=like.dtype, device=like.device)
        return p.expand(D).repeat_interleave(C)

    def _weight_hessian(self, phi: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
        S = glik.hessian_sqrt(self.likelihood, f + self.offset_, self.y_)
        W = S @ S.transpose(-1, -2)
        D, C = phi.shape[1], self.C_
        H = torch.einsum("nd,ne,nab->daeb", phi, phi, W).reshape(D * C, D * C)
        return H, W

    def _fit_weights(self) -> None:
        phi = self.kernel.features(self.X_).to(self._dtype(self.X_))
        D, C = phi.shape[1], self.C_
        prior = self._weight_prior(D, phi, C)
        w = torch.zeros(D * C, dtype=phi.dtype, device=phi.device)

        def psi(w: Tensor) -> Tensor:
            f = phi @ w.reshape(D, C)
            return self.likelihood.log_prob(f + self.offset_, self.y_).sum() - 0.5 * (
                prior * w * w).sum()

        obj = psi(w)
        converged, stop = False, f"max_newton={self.max_newton} steps"
        for _ in range(self.max_newton):
            f = phi @ w.reshape(D, C)
            g = -self.likelihood.gradient(f + self.offset_, self.y_)
            H, _ = self._weight_hessian(phi, f)
            grad = (phi.T @ g).reshape(-1) - prior * w
            L = torch.linalg.cholesky(H + torch.diag(prior))
            w_new = w + torch.cholesky_solve(grad.unsqueeze(-1), L).squeeze(-1)
            obj_new, step = psi(w_new), 0
            floor = obj - 1e-12 * abs(float(obj))
            while obj_new < floor and step < 30:
                w_new, step = 0.5 * (w + w_new), step + 1
                obj_new = psi(w_new)
            if obj_new < floor:  # rejected: no halving increases the objective
                stop = "the line search found no ascent (30 halvings)"
                break
            change = abs(float(obj_new - obj))
            self.history.append({"psi": float(obj_new), "halvings": step})
            w, obj = w_new, obj_new
            if change <= self.newton_tol * (1.0 + abs(float(obj))):
                converged = True
                break
        f = phi @ w.reshape(D, C)
        g = -self.likelihood.gradient(f + self.offset_, self.y_)
        grad = (phi.T @ g).reshape(-1) - prior * w
        self._report(converged, len(self.history), float(grad.norm()), stop)
        f = phi @ w.reshape(D, C)
        H, _ = self._weight_hessian(phi, f)
        self.w_ = w
        self.w_precision_ = H + torch.diag(prior)
        self.w_chol_ = torch.linalg.cholesky(self.w_precision_)
        self.f_ = f
        self.m_ = torch.zeros_like(f)
        self.state_ = None

    # ------------------------------------------------------------------------------------
    # prediction
    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, X, offset=None, *, exposure=None, computational: bool = True,
                chunk: int = 256) -> GLMPrediction:
        """Latent predictive at ``X``: mean, combined covariance blocks, and an upper bound on
        the computational variance (see the module docstring)."""
        self.check_fitted()
        X = self._check_X(X)
        if X.shape[1:] != self.X_.shape[1:]:
            raise ShapeError(
                f"X has points of shape {tuple(X.shape[1:])} but the model was fitted on points "
                f"of shape {tuple(self.X_.shape[1:])} (features per row must match)"
            )
        C = self.C_
        like = self.f_
        o = self._offset(offset, exposure, X.shape[0], C, like)
        if self.state_ is None:  # weight space
            phi = self.kernel.features(X).to(like.dtype)
            mean = phi @ self.w_.reshape(-1, C)
            Jw = torch.einsum("bd,ce->bdce", phi, torch.eye(C, dtype=like.dtype)).reshape(
                X.shape[0], -1, C)  # (B, D*C, C)
            T = torch.linalg.solve_triangular(self.w_chol_, Jw.permute(1, 0, 2).reshape(
                phi.shape[1] * C, -1), upper=False).reshape(-1, X.shape[0], C)
            cov = torch.einsum("pbc,pbd->bcd", T, T)
            return GLMPrediction(mean + o, cov, torch.zeros_like(mean))
        mean = self.kernel.mean(X, C) + self._cross_mm(
            X, self.a_.unsqueeze(-1)).squeeze(-1)
        prior = self.kernel.diag(X, C).to(like.dtype)
        S, state = self.S_, self.state_
        comp = torch.zeros_like(mean)
        if isinstance(state, ActionState):
            Q = self._cross_mm(X, self._S(S, state.D))  # k(x, X) S D
            cov = prior - torch.einsum("bcj,bdj->bcd", Q, Q)
            if computational and state.rank < self.N_ * C:
                step = max(1, min(chunk, 2**24 // (self.N_ * C * C)))  # (N C) x (step C) blocks
                comp = torch.cat([self._computational(x, state) for x in X.split(step)])
                # the computational part never exceeds the combined variance (the exact
                # part is >= 0), which tightens the bound where ‖r‖² is loose
                comp = torch.minimum(comp, torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0))
        else:
            cov = torch.cat([prior_c - self._reduction(x, state) for x, prior_c in
                             zip(X.split(chunk), prior.split(chunk))])
        return GLMPrediction(mean + o, cov, comp)

    def _cross_mm(self, X: Tensor, V: Tensor) -> Tensor:
        """``k(X, X_train) V`` for ``V`` ``(N, C, k)``, restricted to the training points where
        ``V`` is non-zero when those are few (subset / unit-action solves)."""
        rows = self._support(V)
        if rows is None:
            return self.kernel.matmul(X, self.X_, V, self.C_)
        return self.kernel.matmul(X, self.X_[rows], V[rows], self.C_)

    def _cross(self, x: Tensor) -> Tensor:
        """``U = Sᵀ k(X, x)``: ``(N C, B C)`` (one-hot right-hand sides)."""
        B, C = x.shape[0], self.C_
        E = torch.eye(B * C, dtype=self.f_.dtype, device=self.f_.device).reshape(B, C, B * C)
        return self._St(self.S_, self.kernel.matmul(self.X_, x, E, C))

    def _reduction(self, x: Tensor, state: DenseState) -> Tensor:
        B, C = x.shape[0], self.C_
        T = state.project(self._cross(x)).reshape(-1, B, C)
        return torch.einsum("mbc,mbd->bcd", T, T)

    def _computational(self, x: Tensor, state: ActionState) -> Tensor:
        U = self._cross(x)
        R = state.residual(U)
        return (R * R).sum(0).reshape(x.shape[0], self.C_)

    def predict_proba(self, X, offset=None, *, link: str = "probit", num_samples: int = 100,
                      generator: torch.Generator | None = None) -> Tensor:
        """Class probabilities ``(B, C)`` (softmax) or ``p(y = 1)`` ``(B,)`` (binary,
        binomial), integrating the combined covariance with ``link`` (``"probit"``, ``"mc"``)."""
        if not isinstance(self.likelihood, Categorical | Bernoulli | glik.Binomial):
            raise InvalidArgumentError(
                f"predict_proba is for classification; the likelihood is "
                f"{self.likelihood.name!r} (use predict)")
        pred = self.predict(X, offset, computational=False)
        return self.likelihood.predictive(pred.mean, pred.covariance, link, num_samples,
                                          generator)

__all__ = ["IterGLM", "GLMPrediction", "SOLVERS"]
