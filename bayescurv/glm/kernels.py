r"""Prior covariances of the latent function for :class:`~bayescurv.glm.IterGLM`.

The latent :math:`f \in \mathbb R^{N \times C}` is flattened row-major (index ``n * C + c``,
the interleaved multitask order). Every kernel offers

- ``mean(X, C)``: the prior mean :math:`m(X)` ``(N, C)``;
- ``matmul(X1, X2, V, C)``: :math:`K(X_1, X_2) V` for ``V`` of shape ``(N2, C, k)``, matrix-free
  and streamed over blocks of rows (memory ``O(block · N2)``);
- ``dense(X1, X2, C)``: the ``(N1 C, N2 C)`` matrix (for ``solver="cholesky"`` and tests);
- ``diag(X, C)``: the ``(N, C, C)`` prior covariance blocks of single points.

Kernels that are the same for every output (:class:`KernelFunction`,
:class:`OperatorKernel`, :class:`FeatureKernel`) act on each of the ``C`` latent functions
independently, :math:`K \otimes I_C`; :class:`EmpiricalNTK` is a genuine multi-output kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from linear_operator import to_dense
from linear_operator.operators import LinearOperator
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, ShapeError

__all__ = ["GLMKernel", "KernelFunction", "OperatorKernel", "FeatureKernel", "EmpiricalNTK",
           "as_kernel"]


class GLMKernel:
    """Base class; subclasses implement :meth:`block` (or override :meth:`matmul`)."""

    block_size: int = 2048
    #: number of latent outputs fixed by the kernel (``None``: any, shared across outputs)
    num_outputs: int | None = None

    def mean(self, X: Tensor, C: int) -> Tensor:
        return torch.zeros(X.shape[0], C, dtype=self._dtype(X), device=X.device)

    def block(self, X1: Tensor, X2: Tensor) -> Tensor:
        """Dense ``(N1, N2)`` kernel matrix of one block (shared-output kernels)."""
        raise NotImplementedError

    def matmul(self, X1: Tensor, X2: Tensor, V: Tensor, C: int) -> Tensor:
        k = V.shape[-1]
        rhs = V.reshape(V.shape[0], C * k)
        out = [self.block(a, X2) @ rhs for a in X1.split(self.block_size)]
        return torch.cat(out).reshape(X1.shape[0], C, k)

    def dense(self, X1: Tensor, X2: Tensor, C: int) -> Tensor:
        K = torch.cat([self.block(a, X2) for a in X1.split(self.block_size)])
        eye = torch.eye(C, dtype=K.dtype, device=K.device)
        return torch.kron(K, eye)

    def diag(self, X: Tensor, C: int) -> Tensor:
        d = torch.cat([torch.diagonal(self.block(a, a)) for a in X.split(self.block_size)])
        return d[:, None, None] * torch.eye(C, dtype=d.dtype, device=d.device)

    def train(self, X: Tensor, C: int) -> Callable[[Tensor], Tensor]:
        """``V -> K(X, X) V`` for the training inputs (kernels may cache here; a cached
        shared-output kernel also attaches ``.columns(idx) -> K(X, X[idx])``, a gather)."""
        return lambda V: self.matmul(X, X, V, C)

    @staticmethod
    def _dtype(X: Tensor) -> torch.dtype:
        return X.dtype if X.is_floating_point() else torch.get_default_dtype()


class KernelFunction(GLMKernel):
    """A GPyTorch kernel, or any callable ``(X1, X2) -> Tensor | LinearOperator``.

    Args:
        kernel: e.g. ``gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())``; its
            hyperparameters stay differentiable.
        block_size: rows per evaluated block in matrix-free products.
        max_cached: the training matrix is kept in memory when it has at most this many
            entries (``0``: always stream, recomputing blocks at every product).
        mean: optional prior-mean callable ``X -> (N,)`` or ``(N, C)``.
    """

    def __init__(self, kernel: Callable, block_size: int = 2048, max_cached: int = 2**25,
                 mean: Callable[[Tensor], Tensor] | None = None) -> None:
        if not callable(kernel):
            raise InvalidArgumentError(f"kernel must be callable, got {type(kernel).__name__}")
        self.kernel = kernel
        self.block_size = block_size
        self.max_cached = max_cached
        self.mean_fn = mean

    def mean(self, X: Tensor, C: int) -> Tensor:
        if self.mean_fn is None:
            return super().mean(X, C)
        m = self.mean_fn(X)
        return (m.unsqueeze(-1) if m.dim() == 1 else m).expand(X.shape[0], C)

    def block(self, X1: Tensor, X2: Tensor) -> Tensor:
        return to_dense(self.kernel(X1, X2))

    def diag(self, X: Tensor, C: int) -> Tensor:
        from gpytorch.kernels import Kernel

        if not isinstance(self.kernel, Kernel):
            return super().diag(X, C)
        d = to_dense(self.kernel(X, X, diag=True))
        return d[:, None, None] * torch.eye(C, dtype=d.dtype, device=d.device)

    def train(self, X: Tensor, C: int) -> Callable[[Tensor], Tensor]:
        if X.shape[0] ** 2 > self.max_cached or torch.is_grad_enabled():
            return super().train(X, C)
        with torch.no_grad():
            K = torch.cat([self.block(a, X) for a in X.split(self.block_size)])

        def mm(V: Tensor) -> Tensor:
            return (K @ V.reshape(V.shape[0], -1)).reshape(V.shape)

        mm.columns = lambda idx: K[:, idx]
        return mm


class OperatorKernel(GLMKernel):
    """A fixed ``linear_operator`` (or tensor) covariance over a finite index set: inputs
    ``X`` are integer indices into it. Products stay matrix-free:
    :math:`K[i, j] V = E_i^\\top K E_j V` (scatter, one product with the operator, gather)."""

    def __init__(self, operator: LinearOperator | Tensor) -> None:
        if not isinstance(operator, LinearOperator | Tensor) or operator.dim() != 2 \
                or operator.shape[0] != operator.shape[1]:
            raise InvalidArgumentError("operator must be a square LinearOperator or tensor")
        self.operator = operator
        self.size = operator.shape[0]

    def _index(self, X: Tensor) -> Tensor:
        idx = X.reshape(-1) if X.dim() == 2 and X.shape[1] == 1 else X
        if idx.dim() != 1 or idx.is_floating_point() and not torch.equal(idx, idx.round()):
            raise ShapeError("with an OperatorKernel, inputs must be integer indices (N,)")
        idx = idx.long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.size):
            raise ShapeError(f"indices must lie in [0, {self.size - 1}]")
        return idx

    def mean(self, X: Tensor, C: int) -> Tensor:
        return torch.zeros(X.shape[0], C, dtype=self.operator.dtype, device=X.device)

    def matmul(self, X1: Tensor, X2: Tensor, V: Tensor, C: int) -> Tensor:
        i, j = self._index(X1), self._index(X2)
        full = torch.zeros(self.size, V.shape[1] * V.shape[2], dtype=V.dtype, device=V.device)
        full = full.index_add(0, j, V.reshape(V.shape[0], -1))
        return (self.operator @ full)[i].reshape(i.shape[0], C, V.shape[2])

    def block(self, X1: Tensor, X2: Tensor) -> Tensor:
        i, j = self._index(X1), self._index(X2)
        return to_dense(self.operator[i.unsqueeze(-1), j.unsqueeze(0)])

    def diag(self, X: Tensor, C: int) -> Tensor:
        d = to_dense(self.operator.diagonal() if isinstance(self.operator, LinearOperator)
                     else torch.diagonal(self.operator))[self._index(X)]
        return d[:, None, None] * torch.eye(C, dtype=d.dtype, device=d.device)


class FeatureKernel(GLMKernel):
    r"""Weight space: :math:`f(x) = \phi(x)^\top w`, :math:`w \sim N(0, \Lambda_0^{-1})`, so
    :math:`K = \Phi \Lambda_0^{-1} \Phi^\top` (one weight vector per latent output).

    Args:
        prior_precision: :math:`\Lambda_0`, a scalar or one value per feature ``(D,)``; a
            tensor with ``requires_grad`` makes the evidence differentiable in it.
        feature_map: ``X -> Φ`` (default: ``X`` is already the design matrix).
    """

    def __init__(self, prior_precision: float | Tensor = 1.0,
                 feature_map: Callable[[Tensor], Tensor] | None = None) -> None:
        self.prior_precision = prior_precision
        self.feature_map = feature_map

    @property
    def prior_precision(self) -> Tensor:
        return self._prior

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        p = value if torch.is_tensor(value) else torch.as_tensor(value, dtype=torch.float64)
        if p.dim() > 1 or not torch.isfinite(p).all() or (p < 0).any():
            raise InvalidArgumentError(
                "prior_precision must be a non-negative finite scalar or (features,) vector, "
                f"got {value}")
        self._prior = p

    def features(self, X: Tensor) -> Tensor:
        phi = X if self.feature_map is None else self.feature_map(X)
        if phi.dim() != 2:
            raise ShapeError(f"features must be (N, D); got {tuple(phi.shape)}")
        return phi

    def prior_variance(self, D: int, like: Tensor) -> Tensor:
        p = self._prior.to(dtype=like.dtype, device=like.device)
        if p.dim() == 1 and p.numel() != D:
            raise ShapeError(f"prior_precision has {p.numel()} entries for {D} features")
        if (p == 0).any():
            raise InvalidArgumentError(
                "prior_precision = 0 (flat prior) is only available with solver='cholesky' "
                "in weight space")
        return (1.0 / p).expand(D)

    def matmul(self, X1: Tensor, X2: Tensor, V: Tensor, C: int) -> Tensor:
        p1, p2 = self.features(X1), self.features(X2)
        w = torch.einsum("nd,nck->dck", p2, V) * self.prior_variance(p2.shape[1], p2)[:, None,
                                                                                       None]
        return torch.einsum("nd,dck->nck", p1, w)

    def block(self, X1: Tensor, X2: Tensor) -> Tensor:
        p1, p2 = self.features(X1), self.features(X2)
        return (p1 * self.prior_variance(p1.shape[1], p1)) @ p2.T


class EmpiricalNTK(GLMKernel):
    r"""The prior of a network linearized at a fitted :class:`~bayescurv.Laplace`'s
    :math:`\theta^*`:

    .. math:: f_{lin}(x) = f(x;\theta^*) + J(x)(\theta - \theta^*),\quad
              \theta \sim N(0, \Lambda_0^{-1}),

    a GP with mean :math:`f(x;\theta^*) - J(x)\theta^*` and kernel
    :math:`J(x)\Lambda_0^{-1}J(x')^\top` (the empirical NTK weighted by the prior). Products
    are Jacobian-vector and vector-Jacobian products over blocks of data (the ``N x P``
    Jacobian is never formed); ``dense``/``diag`` build per-block Jacobians.

    Since :math:`\theta^*` is the MAP, the Newton iteration starts at its mode, and the GLM
    posterior equals the full-GGN linearized Laplace
    :math:`J(J^\top W J + \Lambda_0)^{-1}J^\top`. (:class:`bayescurv.bo.NTKKernel` is the
    *posterior* kernel :math:`J\Sigma J^\top`.)

    Args:
        laplace: a fitted :class:`~bayescurv.Laplace` (not a masked subnetwork).
        prior_precision: override of ``laplace.prior_diagonal()`` (scalar or ``(P,)``).
        block_size: data points per Jacobian product.
    """

    def __init__(self, laplace, prior_precision: float | Tensor | None = None,
                 block_size: int = 512) -> None:
        from bayescurv.laplace import Laplace

        if not isinstance(laplace, Laplace):
            raise InvalidArgumentError(
                f"laplace must be a bayescurv.Laplace, got {type(laplace).__name__}")
        laplace.check_fitted()
        if laplace.index is not None:
            raise InvalidArgumentError("EmpiricalNTK does not support masked subnetworks")
        self.laplace = laplace
        self.params = laplace.params
        self.prior_precision = prior_precision
        self.block_size = block_size

    def prior_variance(self) -> Tensor:
        p = self.prior_precision
        if p is None:
            p = self.laplace.prior_diagonal()
        p = torch.as_tensor(p, dtype=self.params.dtype, device=self.params.device)
        return (1.0 / p).expand(self.params.numel)

    def as_input(self, X: Tensor) -> Tensor:
        """``X`` on the network's device and in its dtype (what the Jacobian products take)."""
        return X.to(device=self.params.device, dtype=self.params.dtype)

    def mean(self, X: Tensor, C: int) -> Tensor:
        from bayescurv.curvature.matfree import jacobian_vector_product

        X = self.as_input(X)
        theta = self.params.vector()
        out = []
        for x in X.split(self.block_size):
            with torch.no_grad():
                f = self.params.forward(x)  # read with the posterior's output_key
            f = f.reshape(f.shape[0], -1)
            out.append(f - jacobian_vector_product(self.params.model, self.params, x, theta))
        m = torch.cat(out)
        self._check_C(m.shape[1], C)
        return m

    def _check_C(self, have: int, C: int) -> None:
        if have != C:
            raise ShapeError(f"the network has {have} outputs but the likelihood needs {C}")

    def matmul(self, X1: Tensor, X2: Tensor, V: Tensor, C: int) -> Tensor:
        from bayescurv.curvature.matfree import jacobian_vector_product, vector_jacobian_product

        X1, X2 = self.as_input(X1), self.as_input(X2)
        model, ps = self.params.model, self.params
        U = sum(vector_jacobian_product(model, ps, x, v)
                for x, v in zip(X2.split(self.block_size), V.split(self.block_size)))
        U = U * self.prior_variance().unsqueeze(-1)
        return torch.cat([jacobian_vector_product(model, ps, x, U)
                          for x in X1.split(self.block_size)])

    def _jac(self, X: Tensor) -> list[Tensor]:
        from bayescurv.curvature.matfree import jacobian

        return [jacobian(self.params.model, self.params, x) for x in self.as_input(X).split(
            self.block_size)]

    def dense(self, X1: Tensor, X2: Tensor, C: int) -> Tensor:
        J1 = torch.cat(self._jac(X1)).flatten(0, 1)
        J2 = torch.cat(self._jac(X2)).flatten(0, 1)
        return (J1 * self.prior_variance()) @ J2.T

    def diag(self, X: Tensor, C: int) -> Tensor:
        v = self.prior_variance()
        return torch.cat([torch.einsum("ncp,ndp->ncd", J * v, J) for J in self._jac(X)])


def as_kernel(kernel) -> GLMKernel:
    """Wrap what the user passed: a :class:`GLMKernel`, a fitted ``Laplace`` (empirical
    NTK), a ``LinearOperator``/tensor (index set), ``"features"``/``None`` (the inputs are
    the design matrix, unit prior precision), or a GPyTorch kernel / callable."""
    from bayescurv.laplace import Laplace

    if isinstance(kernel, GLMKernel):
        return kernel
    if kernel is None or isinstance(kernel, str) and kernel == "features":
        return FeatureKernel()
    if isinstance(kernel, Laplace):
        return EmpiricalNTK(kernel)
    if isinstance(kernel, LinearOperator | Tensor):
        return OperatorKernel(kernel)
    if callable(kernel):
        return KernelFunction(kernel)
    raise InvalidArgumentError(
        f"cannot use {type(kernel).__name__} as a kernel; pass a GPyTorch kernel, a "
        "LinearOperator, a fitted Laplace, 'features' or a GLMKernel")
