"""The coefficient table of a fitted :class:`~bayescurv.glm.IterGLM` with a feature
(weight-space) kernel: posterior mean and covariance of the weights, the deviance and a
statsmodels-style summary. A mixin of :class:`~bayescurv.glm.IterGLM`: it reads the fitted
state (``X_``, ``f_``, ``a_``, ``S_``, ``state_``, ``w_``, ``w_chol_``, ...) that ``fit`` sets."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.glm import likelihoods as glik
from bayescurv.glm.kernels import FeatureKernel
from bayescurv.glm.solver import DenseState


class CoefficientsMixin:
    """``coefficients``, ``deviance`` and ``summary`` of :class:`~bayescurv.glm.IterGLM`."""

    def coefficients(self) -> tuple[Tensor, Tensor]:
        r"""Posterior mean ``(D, C)`` and covariance ``(D C, D C)`` of the weights of a feature
        model (index ``d * C + c``). In function space: :math:`\bar w = \Lambda_0^{-1}\Phi^\top
        a`, :math:`\Sigma_w = \Lambda_0^{-1} - \Lambda_0^{-1}\Phi^\top S C S^\top \Phi
        \Lambda_0^{-1}` (combined, as the latent covariance)."""
        self.check_fitted()
        if not isinstance(self.kernel, FeatureKernel):
            raise InvalidArgumentError("coefficients need a feature (weight-space) kernel")
        C = self.C_
        if self.state_ is None:
            cov = torch.cholesky_inverse(self.w_chol_)
            return self.w_.reshape(-1, C), cov
        phi = self.kernel.features(self.X_).to(self.f_.dtype)
        D = phi.shape[1]
        var = self.kernel.prior_variance(D, phi)
        mean = var[:, None] * (phi.T @ self.a_)
        # Φᵀ S: (D*C, N*C)
        PS = torch.einsum("nd,nca->dcna", phi, self.S_).reshape(D * C, -1)
        if isinstance(self.state_, DenseState):
            T = self.state_.project(PS.T)
            red = T.T @ T
        else:
            T = PS @ self.state_.D
            red = T @ T.T
        v = var.repeat_interleave(C)
        cov = torch.diag(v) - v[:, None] * red * v[None, :]
        return mean, cov

    def deviance(self) -> float:
        """:math:`2[\\log p(y|\\text{saturated}) - \\log p(y|\\hat f)]`."""
        self.check_fitted()
        ll = self.likelihood.log_prob(self.f_ + self.offset_, self.y_).sum()
        return float(2 * (glik.saturated_log_prob(self.likelihood, self.y_) - ll))

    def summary(self, names: list[str] | None = None, level: float = 0.95) -> str:
        """A statsmodels-style table: per coefficient the posterior mean, sd, ``z`` and the
        central credible interval at ``level``; the deviance and the log evidence."""
        mean, cov = self.coefficients()
        sd = torch.diagonal(cov).clamp_min(0).sqrt().reshape(mean.shape)
        zq = math.sqrt(2) * float(torch.erfinv(torch.tensor(level, dtype=torch.float64)))
        D, C = mean.shape
        names = names or [f"x{d}" for d in range(D)]
        if len(names) != D:
            raise ShapeError(f"{len(names)} names for {D} coefficients")
        lo, hi = (1 - level) / 2, (1 + level) / 2
        head = f"{'':>14} {'mean':>11} {'sd':>10} {'z':>8} {lo:>10.3f} {hi:>10.3f}"
        lines = [f"IterGLM  likelihood={self.likelihood.name}  solver={self.solver}"
                 + ("" if self.solver == "cholesky" else f"  policy={self.policy}"),
                 f"observations={self.N_}  outputs={C}  deviance={self.deviance():.4f}", head,
                 "-" * len(head)]
        for c in range(C):
            if C > 1:
                lines.append(f"output {c}")
            for d in range(D):
                mu, s = float(mean[d, c]), float(sd[d, c])
                lines.append(f"{names[d][:14]:>14} {mu:>11.4f} {s:>10.4f} "
                             f"{mu / s if s > 0 else float('nan'):>8.3f} {mu - zq * s:>10.4f} "
                             f"{mu + zq * s:>10.4f}")
        try:
            lines.append(f"log evidence (Laplace) = {float(self.log_marginal_likelihood()):.4f}")
        except InvalidArgumentError:
            pass
        return "\n".join(lines)


__all__ = ["CoefficientsMixin"]
