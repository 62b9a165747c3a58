r"""The empirical NTK of a linearized Laplace posterior as a GPyTorch kernel.

.. math::
    k(x, x') = J(x)\,\Sigma\,J(x')^\top \in \mathbb{R}^{m \times m},
    \qquad \Sigma = \Lambda^{-1},

with :math:`J(x) = \partial f(x;\theta)/\partial\theta|_{\theta^*}` over the posterior's
parameters. Blocks come from :meth:`bayescurv.Laplace.functional` on the stacked inputs, which
uses the posterior's structure (per layer, Kronecker eigenbases) and never forms a whole-net
Jacobian for structured posteriors. With ``m > 1`` outputs the kernel is multitask: the
matrix is ``(n1 m) x (n2 m)`` in interleaved order (index ``i * m + c``), as
:class:`~gpytorch.distributions.MultitaskMultivariateNormal` expects.

A GPyTorch model with mean :math:`f(x;\theta^*)` and this kernel *is* the Laplace GLM
predictive (before observation noise).
"""

from __future__ import annotations

import torch
from gpytorch.kernels import Kernel
from linear_operator import to_linear_operator
from linear_operator.operators import LinearOperator
from torch import Tensor

from bayescurv.bo.joint import functional
from bayescurv.errors import InvalidArgumentError
from bayescurv.laplace import Laplace


class NTKKernel(Kernel):
    r""":math:`k(x, x') = J(x)\Sigma J(x')^\top` of a fitted :class:`~bayescurv.Laplace`.

    Args:
        laplace: a fitted Laplace posterior (regression); its hyperparameters are read at
            every call, so tuning them afterwards changes the kernel.
        max_points: the largest number of stacked inputs per ``functional`` call; larger
            batches are split into blocks.
    """

    has_lengthscale = False

    def __init__(self, laplace: Laplace, max_points: int = 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(laplace, Laplace):
            raise InvalidArgumentError(
                f"laplace must be a fitted bayescurv.Laplace, got {type(laplace).__name__}")
        laplace.check_fitted()
        self.laplace = laplace
        self.max_points = max_points

    @property
    def num_tasks(self) -> int:
        return max(self.laplace.num_outputs, 1)

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return self.num_tasks

    def _cross(self, x1: Tensor, x2: Tensor, same: bool) -> Tensor:
        """``(n1 m, n2 m)`` for unbatched ``x1 (n1, d)``, ``x2 (n2, d)``."""
        n1, n2, m = x1.shape[0], x2.shape[0], self.num_tasks
        if same and n1 <= self.max_points:
            return functional(self.laplace, x1, joint=True)[1]
        if n1 + n2 <= self.max_points:
            cov = functional(self.laplace, torch.cat([x1, x2]), joint=True)[1]
            return cov[: n1 * m, n1 * m:]
        # blockwise: split both sides so every call stacks at most max_points inputs
        step = max(1, self.max_points // 2)
        rows = []
        for a in x1.split(step):
            rows.append(torch.cat([self._cross(a, b, False) for b in x2.split(step)], -1))
        return torch.cat(rows, -2)

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False,
        **params,
    ) -> Tensor | LinearOperator:
        if last_dim_is_batch:
            raise NotImplementedError("NTKKernel does not support last_dim_is_batch")
        d = x1.shape[-1]
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        if diag:
            batch = x1.shape[:-2]
            cov = functional(self.laplace, x1.reshape(-1, d))[1]  # (N, m, m)
            return cov.diagonal(dim1=-2, dim2=-1).reshape(*batch, -1)
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
        a = x1.expand(*batch, *x1.shape[-2:]).reshape(-1, *x1.shape[-2:])
        b = x2.expand(*batch, *x2.shape[-2:]).reshape(-1, *x2.shape[-2:])
        blocks = [self._cross(ai, bi, same) for ai, bi in zip(a, b)]
        out = torch.stack(blocks).reshape(*batch, *blocks[0].shape)
        return to_linear_operator(out)
