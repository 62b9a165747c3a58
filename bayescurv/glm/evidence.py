r"""The Laplace evidence of a fitted :class:`~bayescurv.glm.IterGLM` and type-II maximum
likelihood of its kernel hyperparameters. A mixin of :class:`~bayescurv.glm.IterGLM`: it reads
the fitted state (``X_``, ``y_``, ``f_``, ``state_``, ``w_``, ...) that ``fit`` sets."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from bayescurv.errors import ConvergenceWarning, InvalidArgumentError, NonFiniteError
from bayescurv.glm import likelihoods as glik
from bayescurv.glm.kernels import KernelFunction
from bayescurv.glm.solver import DenseState


class EvidenceMixin:
    """``log_marginal_likelihood`` and ``fit_hyperparameters`` of
    :class:`~bayescurv.glm.IterGLM`."""

    def log_marginal_likelihood(self) -> Tensor:
        r"""Laplace log evidence at the fitted mode,

        .. math:: \log q(y) = \log p(y|\hat f) - \tfrac12 a^\top K a - \tfrac12\log\det A,

        differentiable in the kernel's hyperparameters and prior precision: one Newton step
        from the (detached) mode is taken with graph, which gives the exact implicit
        derivative of :math:`\hat f` and of :math:`W(\hat f)` (Newton's map has zero derivative
        in :math:`f` at its fixed point). For the iterative solver :math:`A` is replaced by
        its projection :math:`D^\top A D` on the action space (:math:`\log\det` by
        :math:`\log\det D^\top A D - \log\det D^\top D \le \log\det A`), exact when the actions
        span the space. In weight space: :math:`\log p(y|\hat w) - \tfrac12 \hat w^\top
        \Lambda_0 \hat w - \tfrac12\log\det(\Lambda_0 + \Phi^\top W\Phi) + \tfrac12\log\det
        \Lambda_0`."""
        self.check_fitted()
        if self.state_ is None:
            return self._weight_evidence()
        X, C, y, o = self.X_, self.C_, self.y_, self.offset_
        m = self.kernel.mean(X, C)
        f0 = self.f_.detach()
        S0, u0 = glik.sites(self.likelihood, f0 + o, y)
        z = self._St(S0, (f0 - m).unsqueeze(-1)) + u0.reshape(-1, 1)
        state = self.state_
        if isinstance(state, DenseState):
            Kd = self.kernel.dense(X, X, C)
            v = torch.linalg.solve(self._dense_A(Kd, S0), z)
            a = self._S(S0, v).squeeze(-1)
            f = m + (Kd @ a.reshape(-1)).reshape(a.shape)
            S = glik.hessian_sqrt(self.likelihood, f + o, y)
            logdet = torch.linalg.slogdet(self._dense_A(Kd, S))[1]
        else:
            D = state.D

            def K_mv(V):
                return self.kernel.matmul(X, X, V, C)

            AD0 = D + self._St(S0, K_mv(self._S(S0, D)))
            v = D @ torch.linalg.solve(D.T @ AD0, D.T @ z)
            a = self._S(S0, v).squeeze(-1)
            f = m + K_mv(a.unsqueeze(-1)).squeeze(-1)
            S = glik.hessian_sqrt(self.likelihood, f + o, y)
            AD = D + self._St(S, K_mv(self._S(S, D)))
            logdet = torch.linalg.slogdet(D.T @ AD)[1] - torch.linalg.slogdet(D.T @ D)[1]
        return self.likelihood.log_prob(f + o, y).sum() - 0.5 * (a * (f - m)).sum() \
            - 0.5 * logdet

    def _weight_evidence(self) -> Tensor:
        phi = self.kernel.features(self.X_).to(self.f_.dtype)
        D, C = phi.shape[1], self.C_
        prior = self._weight_prior(D, phi, C)
        if (prior == 0).any():
            raise InvalidArgumentError("the evidence needs a positive prior precision")
        w0 = self.w_.detach()
        f0 = phi @ w0.reshape(D, C)
        g = -self.likelihood.gradient(f0 + self.offset_, self.y_)
        H0, _ = self._weight_hessian(phi, f0)
        grad = (phi.T @ g).reshape(-1) - prior * w0
        w = w0 + torch.linalg.solve(H0 + torch.diag(prior), grad)
        f = phi @ w.reshape(D, C)
        H, _ = self._weight_hessian(phi, f)
        return (self.likelihood.log_prob(f + self.offset_, self.y_).sum()
                - 0.5 * (prior * w * w).sum() - 0.5 * torch.linalg.slogdet(
                    H + torch.diag(prior))[1] + 0.5 * torch.log(prior).sum())

    def kernel_parameters(self) -> list[nn.Parameter]:
        """The trainable hyperparameters of a :class:`~bayescurv.glm.KernelFunction` wrapping
        an ``nn.Module`` (e.g. a GPyTorch kernel's raw lengthscale and outputscale)."""
        k = getattr(self.kernel, "kernel", None)
        if not isinstance(self.kernel, KernelFunction) or not isinstance(k, nn.Module):
            raise InvalidArgumentError(
                "fit_hyperparameters needs a kernel that is an nn.Module (e.g. a GPyTorch "
                f"kernel) with trainable parameters; got {type(self.kernel).__name__}")
        params = [p for p in k.parameters() if p.requires_grad]
        if not params:
            raise InvalidArgumentError("the kernel has no parameters with requires_grad=True")
        return params

    def fit_hyperparameters(self, X, y, offset=None, *, exposure=None, n_steps: int = 30,
                            lr: float = 0.05, tol: float = 1e-3):
        r"""Learn the kernel hyperparameters :math:`\vartheta` by type-II maximum likelihood,
        :math:`\max_\vartheta \log q(y|\vartheta)` (:meth:`log_marginal_likelihood`; for the
        iterative solver the computation-aware evidence, :math:`\log\det A` projected on the
        solver's actions), with Adam (step ``lr``) on the kernel's trainable parameters: each
        step refits the mode at the current values and differentiates the evidence there. Stops
        after ``n_steps`` or when the evidence changes by less than ``tol`` (relative) twice in a
        row; then fits at the learned values and returns ``self``. ``hyper_history``: the
        evidence per step."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise InvalidArgumentError(f"n_steps must be a positive int, got {n_steps!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise InvalidArgumentError(f"lr must be a positive number, got {lr!r}")
        params = self.kernel_parameters()
        opt = torch.optim.Adam(params, lr=lr)
        self.hyper_history: list[float] = []
        calm = 0
        for _ in range(n_steps):
            with warnings.catch_warnings():  # an unconverged intermediate fit is expected
                warnings.simplefilter("ignore", ConvergenceWarning)
                self.fit(X, y, offset, exposure=exposure)
            opt.zero_grad()
            lml = self.log_marginal_likelihood()
            if not bool(torch.isfinite(lml)):
                raise NonFiniteError("the evidence became non-finite while learning the kernel "
                                     "hyperparameters; lower lr")
            (-lml).backward()
            opt.step()
            value = float(lml.detach())
            if self.hyper_history and abs(value - self.hyper_history[-1]) <= tol * (
                    1.0 + abs(value)):
                calm += 1
            else:
                calm = 0
            self.hyper_history.append(value)
            if calm >= 2:
                break
        return self.fit(X, y, offset, exposure=exposure)


__all__ = ["EvidenceMixin"]
