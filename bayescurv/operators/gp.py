r"""The linearized-Laplace neural operator as a function-valued Gaussian process (LUNO).

Linearizing the operator in the posterior weights :math:`\theta` (a subset, typically the last
Fourier block) around :math:`\theta^*`,
:math:`u_{lin}(a)(x) = u(a; \theta^*)(x) + J_a(x)(\theta - \theta^*)`, turns the Gaussian
posterior :math:`\theta \sim N(\theta^*, \Sigma)` into a GP over output functions:

.. math:: u(a)(x) \sim GP\big(u(a;\theta^*)(x),\; J_a(x)\, \Sigma\, J_a(x')^\top\big).

``x`` may lie on any output grid: :math:`J_a(x)` is the Jacobian of the operator evaluated
at that resolution (inverse FFT at the new size). ``Σ`` is held as

.. math:: \Sigma = \operatorname{diag}(v) + A A^\top - W W^\top,

which covers a diagonal posterior (``A = W = 0``), an isotropic one (:math:`v = \sigma^2`),
a low-rank GGN plus diagonal prior by Woodbury (:math:`\Lambda = U S U^\top + D`:
:math:`v = 1/d`, :math:`W = D^{-1} U S^{1/2} L^{-\top}` with
:math:`L L^\top = I + S^{1/2} U^\top D^{-1} U S^{1/2}`), and any other posterior densely
(:math:`A = \Lambda^{-1/2}`; small subsets only). The marginal variance at ``x`` is
:math:`\sum_p J_p^2 v_p + \|J A\|^2 - \|J W\|^2`, from Jacobian rows formed per chunk of
inputs by ``torch.func`` (never for the whole data set at once); function samples are
:math:`u(a;\theta^*) + J_a \varepsilon` with :math:`\varepsilon \sim N(0, \Sigma)` applied to
the same Jacobian rows, so the *same* weight draw gives the same sample function on every
grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from bayescurv.deprecation import UNSET, renamed
from bayescurv.errors import InvalidArgumentError, NonFiniteError, ShapeError
from bayescurv.linalg import Diagonal, LowRankPlusDiagonal, PSDOperator
from bayescurv.operators.fno import FlattenOutput, call_operator, check_input
from bayescurv.params import ParamSet, select

#: entries of the largest Jacobian chunk ``(b, C, P)`` formed at once
CHUNK_ELEMENTS = 2**24


def _flat_params(model: nn.Module, subset) -> tuple[FlattenOutput, ParamSet]:
    """The operator wrapped to flat outputs and its posterior parameters (names of
    ``model``'s own parameters, or of a :class:`FlattenOutput` when ``model`` is one)."""
    if isinstance(model, FlattenOutput):
        flat = model
        pset = subset if isinstance(subset, ParamSet) else select(flat, subset)
        return flat, pset
    flat = FlattenOutput(model)
    if isinstance(subset, ParamSet):
        names = [f"operator.{n}" for n in subset.names]
        return flat, ParamSet(flat, names, list(subset.params))
    inner = select(model, subset)
    return flat, ParamSet(flat, [f"operator.{n}" for n in inner.names], list(inner.params))


class OperatorGP:
    """Function-valued GP predictive of a neural operator linearized in ``params``.

    Args:
        model: the operator (``(B, in, *n) -> (B, out, *n)``) or a :class:`FlattenOutput`.
        params: posterior parameters: a :class:`~bayescurv.params.ParamSet` of ``model``,
            ``"all"``, ``"last_layer"`` or a list of parameter / module names.
        precision: posterior precision ``Λ`` over ``params`` (flat order), a
            :class:`~bayescurv.linalg.PSDOperator`.
        sigma_noise: observation noise added by :meth:`predict`.

    Build it from a fitted :class:`bayescurv.Laplace` with :meth:`from_laplace`, or with an
    isotropic covariance :math:`\\sigma^2 I` with :meth:`isotropic`.
    """

    def __init__(
        self,
        model: nn.Module,
        params,
        precision: PSDOperator,
        sigma_noise: float | Tensor = 0.0,
    ) -> None:
        self.model, self.params = _flat_params(model, params)
        if precision.size != self.params.numel:
            raise ShapeError(f"precision is {precision.size} x {precision.size} but the "
                             f"parameter subset has {self.params.numel} entries")
        self.precision = precision
        self.theta = self.params.vector()
        noise = torch.as_tensor(sigma_noise, dtype=self.theta.dtype, device=self.theta.device)
        if noise.numel() != 1:
            raise ShapeError(f"sigma_noise must be a scalar, got shape {tuple(noise.shape)}")
        if not bool(torch.isfinite(noise).all()) or bool((noise < 0).any()):
            raise InvalidArgumentError(
                f"sigma_noise must be finite and >= 0, got {float(noise.reshape(()))}")
        self.sigma_noise = noise.reshape(())
        self._factors()

    # construction ------------------------------------------------------------------------
    @classmethod
    def from_laplace(cls, la) -> OperatorGP:
        """The GP of a fitted :class:`bayescurv.Laplace` whose model is a
        :class:`FlattenOutput` (or any operator with flat outputs): its parameters, posterior
        precision at the current hyperparameters, and observation noise."""
        la.check_fitted()
        if la.index is not None:
            raise InvalidArgumentError("masked subnetworks are not supported by OperatorGP; "
                                       "select parameters by name")
        if la.per_output_noise:
            raise InvalidArgumentError("OperatorGP needs a scalar sigma_noise")
        noise = la.sigma_noise if la.likelihood.name == "regression" else 0.0
        return cls(la.model, la.params, la.posterior_precision, noise)

    @classmethod
    def isotropic(cls, model: nn.Module, params, variance: float = 1.0,
                  sigma_noise: float | Tensor = 0.0) -> OperatorGP:
        r"""The linearized GP with :math:`\Sigma = \sigma^2 I` (``variance`` :math:`= \sigma^2`)."""
        if not variance > 0:
            raise InvalidArgumentError(f"variance must be positive, got {variance}")
        flat, pset = _flat_params(model, params)
        d = torch.full((pset.numel,), 1.0 / variance, dtype=pset.dtype, device=pset.device)
        return cls(flat, pset, Diagonal(d), sigma_noise)

    def _factors(self) -> None:
        """``v``, ``A``, ``W`` of :math:`\\Sigma = diag(v) + A A^T - W W^T` (module docstring)."""
        lam = self.precision
        self.A: Tensor | None = None
        self.W: Tensor | None = None
        if isinstance(lam, Diagonal):
            self.v = lam.inv_diagonal()
        elif isinstance(lam, LowRankPlusDiagonal):
            d = lam.d
            root = lam.U * lam.s.clamp_min(0).sqrt()
            z = root / d.unsqueeze(-1)
            cap = torch.eye(root.shape[1], dtype=d.dtype, device=d.device) + root.T @ z
            chol = torch.linalg.cholesky(cap)
            self.v = 1.0 / d
            self.W = torch.linalg.solve_triangular(chol, z.T, upper=False).T
        else:  # dense fallback: Λ^{-1/2}
            eye = torch.eye(lam.size, dtype=lam.dtype, device=lam.device)
            self.v = torch.zeros(lam.size, dtype=lam.dtype, device=lam.device)
            self.A = lam.inv_sqrt_matvec(eye)

    # the network ---------------------------------------------------------------------------
    def _f(self, theta: Tensor, a: Tensor, out_size) -> Tensor:
        return torch.func.functional_call(self.model, self.params.as_dict(theta), (a,),
                                          {"out_size": out_size})

    def _check(self, a: Tensor) -> Tensor:
        if not torch.is_tensor(a) or not a.is_floating_point():
            raise InvalidArgumentError("inputs must be a floating-point tensor (B, in, *grid)")
        a = a.to(device=self.theta.device, dtype=self.theta.dtype)
        if not torch.isfinite(a).all():
            raise NonFiniteError("inputs hold NaN or Inf")
        check_input(self.model, a)  # the whole batch (shapes are inferred from a[:1])
        return a

    def _shape(self, a: Tensor, out_size) -> tuple[int, ...]:
        """Output shape ``(out, *grid)`` of one input function at ``out_size``."""
        with torch.no_grad():
            return tuple(call_operator(self.model.operator, a[:1], out_size).shape[1:])

    @torch.no_grad()
    def mean(self, a: Tensor, out_size=None) -> Tensor:
        """Predictive mean :math:`u(a;\\theta^*)` ``(B, out, *grid)`` on the output grid."""
        a = self._check(a)
        shape = self._shape(a, out_size)
        return self._f(self.theta, a, out_size).reshape(a.shape[0], *shape)

    def jacobian_rows(self, a: Tensor, out_size=None) -> Iterator[tuple[slice, Tensor]]:
        """Jacobians ``(b, C, P)`` of the flat outputs w.r.t. the posterior parameters, in
        chunks of inputs of at most :data:`CHUNK_ELEMENTS` entries; yields ``(slice, J)``."""
        a = self._check(a)
        c = math.prod(self._shape(a, out_size))
        p = self.params.numel

        def one(theta: Tensor, ab: Tensor) -> Tensor:
            return self._f(theta, ab.unsqueeze(0), out_size).squeeze(0)

        jac = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0))
        step = max(1, CHUNK_ELEMENTS // max(1, c * p))
        for s in range(0, a.shape[0], step):
            sl = slice(s, min(a.shape[0], s + step))
            yield sl, jac(self.theta, a[sl]).detach()

    def jacobian_variance(self, jac: Tensor) -> Tensor:
        """Marginal variances ``(b, C)`` from Jacobian rows ``(b, C, P)`` (as yielded by
        :meth:`jacobian_rows`; reuse them for several posteriors over the same parameters)."""
        jac = jac.to(self.v.dtype)  # the posterior's (internal, float64) dtype
        var = jac.square() @ self.v
        if self.A is not None:
            var = var + (jac @ self.A).square().sum(-1)
        if self.W is not None:
            var = var - (jac @ self.W).square().sum(-1)
        return var.clamp_min(0)

    def _cov_rows(self, jac: Tensor) -> Tensor:
        jac = jac.to(self.v.dtype)
        cov = torch.einsum("bcp,bdp->bcd", jac * self.v, jac)
        for f, sign in ((self.A, 1.0), (self.W, -1.0)):
            if f is not None:
                jf = jac @ f
                cov = cov + sign * jf @ jf.transpose(-1, -2)
        return 0.5 * (cov + cov.transpose(-1, -2))

    def variance(self, a: Tensor, out_size=None) -> Tensor:
        """Marginal variance of the latent function at every grid point ``(B, out, *grid)``
        (without observation noise)."""
        a = self._check(a)
        shape = self._shape(a, out_size)
        out = torch.empty(a.shape[0], math.prod(shape), dtype=a.dtype, device=a.device)
        for sl, jac in self.jacobian_rows(a, out_size):
            out[sl] = self.jacobian_variance(jac)
        return out.reshape(a.shape[0], *shape)

    def covariance(self, a: Tensor, out_size=None) -> Tensor:
        """Joint covariance over the output grid of each input, ``(B, C, C)`` with
        ``C = out * prod(grid)`` (flattened channel-major)."""
        a = self._check(a)
        c = math.prod(self._shape(a, out_size))
        out = torch.empty(a.shape[0], c, c, dtype=a.dtype, device=a.device)
        for sl, jac in self.jacobian_rows(a, out_size):
            out[sl] = self._cov_rows(jac)
        return out

    def lowrank_covariance(self, a: Tensor, rank: int, out_size=None) -> list[LowRankPlusDiagonal]:
        """Per input, the top-``rank`` eigenpairs of the joint covariance over the grid plus the
        diagonal of the remainder (so the marginal variances stay exact):
        ``U diag(s) Uᵀ + diag(r)`` as :class:`~bayescurv.linalg.LowRankPlusDiagonal`."""
        if not isinstance(rank, int) or rank < 1:
            raise InvalidArgumentError(f"rank must be a positive integer, got {rank!r}")
        out = []
        for cov in self.covariance(a, out_size):
            lam, q = torch.linalg.eigh(cov)
            lam, q = lam.flip(0)[:rank].clamp_min(0), q.flip(1)[:, :rank]
            resid = (cov.diagonal() - q.square() @ lam).clamp_min(torch.finfo(cov.dtype).tiny)
            out.append(LowRankPlusDiagonal(q, lam, resid))
        return out

    def sample(self, a: Tensor, num_samples: int = 100, out_size=None,
               generator: torch.Generator | None = None, linearized: bool = True,
               weights: Tensor | None = None, *, n: int = UNSET) -> Tensor:
        """``num_samples`` function samples ``(num_samples, B, out, *grid)``: of the linearized GP
        (:math:`u(a;\\theta^*) + J_a\\varepsilon`) or, ``linearized=False``, of the network
        at sampled weights :math:`u(a;\\theta^* + \\varepsilon)` (sample-based Laplace).
        ``weights``: the draws :math:`\\varepsilon` ``(num_samples, P)`` to reuse (e.g. the
        same functions on two grids); default: fresh draws from :math:`N(0, \\Sigma)`.
        ``n``: deprecated name of ``num_samples`` (a ``FutureWarning``)."""
        name = "num_samples" if n is UNSET else "n"  # errors name the argument passed
        n = renamed(num_samples, n, "num_samples", "n", "OperatorGP.sample")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {n}")
        a = self._check(a)
        shape = self._shape(a, out_size)
        eps = self.precision.sample_inverse(n, generator) if weights is None else weights
        if eps.shape != (n, self.params.numel):
            raise ShapeError(f"weights must be ({n}, {self.params.numel}), got "
                             f"{tuple(eps.shape)}")
        eps = eps.to(self.theta.dtype)
        if linearized:
            samples = self.mean(a, out_size).reshape(1, a.shape[0], -1).repeat(n, 1, 1)
            for sl, jac in self.jacobian_rows(a, out_size):
                samples[:, sl] += torch.einsum("bcp,np->nbc", jac, eps.to(jac.dtype))
        else:
            with torch.no_grad():
                samples = torch.stack([self._f(self.theta + e, a, out_size) for e in eps])
        return samples.reshape(n, a.shape[0], *shape)

    def predict(self, a: Tensor, out_size=None) -> tuple[Tensor, Tensor]:
        """Predictive mean and variance of noisy observations, each ``(B, out, *grid)``."""
        return self.mean(a, out_size), self.variance(a, out_size) + self.sigma_noise**2


def tune_prior_precision(
    la,
    method: str = "marglik",
    val: tuple[Tensor, Tensor] | None = None,
    grid: Iterable[float] | Tensor | None = None,
    tune_sigma_noise: bool = False,
    **marglik_options,
) -> Tensor:
    r"""Set the prior precision of a fitted :class:`bayescurv.Laplace` over a neural operator:
    ``"marglik"`` (Laplace evidence, :meth:`~bayescurv.Laplace.optimize_prior_precision`, which
    is L-BFGS) or ``"val_nll"`` (grid search minimizing the Gaussian NLL of
    :class:`OperatorGP` on ``val = (a, u)``; the Jacobian rows of the validation inputs are
    formed once and reused for every grid value). Returns the chosen prior precision (also set
    on ``la``).

    ``tune_sigma_noise=True`` also sets the observation noise :math:`\sigma` (no hand-set
    value): with ``"marglik"`` by the evidence; with ``"val_nll"`` jointly with the prior by the
    validation NLL. The posterior of a Gaussian likelihood is :math:`\Sigma(\delta, \sigma) =
    (H/\sigma^2 + \delta I)^{-1} = \sigma^2 (H + \delta\sigma^2 I)^{-1}`, so the predictive
    variance is :math:`\sigma^2 (v_1(\tau) + 1)` with :math:`v_1(\tau)` the epistemic variance
    at unit noise and prior :math:`\tau = \delta\sigma^2`: ``grid`` runs over :math:`\tau`,
    and for each :math:`\tau` the best :math:`\sigma^2` is found on a log grid (no new
    Jacobians); the result sets ``la.sigma_noise`` and ``la.prior_precision``
    :math:`= \tau/\sigma^2`."""
    if method == "marglik":
        return la.optimize_prior_precision(method="marglik", tune_sigma_noise=tune_sigma_noise,
                                           **marglik_options)
    if method != "val_nll":
        raise InvalidArgumentError(f"unknown method {method!r}; use 'marglik' or 'val_nll'")
    if val is None:
        raise InvalidArgumentError("method='val_nll' needs val=(inputs, targets)")
    try:
        grid = torch.logspace(-4, 4, 17) if grid is None else torch.as_tensor(
            grid, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidArgumentError(
            f"grid must be a sequence or tensor of positive prior precisions, got "
            f"{type(grid).__name__} ({err})"
        ) from None
    if grid.numel() == 0 or not bool(torch.isfinite(grid).all()) or bool((grid <= 0).any()):
        raise InvalidArgumentError("grid must hold positive prior precisions (finite, > 0)")
    if not isinstance(val, (tuple, list)) or len(val) != 2:
        raise InvalidArgumentError("val must be a pair (inputs, targets) of tensors")
    if tune_sigma_noise:
        la.sigma_noise = 1.0  # unit noise: v_1(τ); σ is chosen below
    gp = OperatorGP.from_laplace(la)
    a, u = val
    a = gp._check(a)
    mean = gp.mean(a).reshape(a.shape[0], -1)
    u = torch.as_tensor(u)
    if u.numel() != mean.numel() or u.shape[0] != a.shape[0]:
        raise ShapeError(
            f"validation targets of shape {tuple(u.shape)} do not match the operator's outputs "
            f"{tuple(gp.mean(a[:1]).shape[1:])} for each of the {a.shape[0]} inputs"
        )
    if u.is_floating_point() and not bool(torch.isfinite(u).all()):
        raise NonFiniteError("validation targets hold NaN or Inf")
    u = u.to(mean).reshape(mean.shape)
    rows = list(gp.jacobian_rows(a))
    mse = float((mean - u).double().square().mean())
    noise = torch.logspace(-6, 1, 57, dtype=torch.float64) * max(mse, 1e-300)
    best, best_prior, best_s2 = float("inf"), None, None
    for prior in grid.to(la.params.dtype):
        la.prior_precision = prior
        gp = OperatorGP.from_laplace(la)
        var = torch.cat([gp.jacobian_variance(j) for _, j in rows])
        for s2 in (noise if tune_sigma_noise else [None]):
            total = var + gp.sigma_noise**2 if s2 is None else s2 * (var + 1.0)
            value = gaussian_nll(mean.to(var.dtype), total, u.to(var.dtype))
            if value < best:
                best, best_prior, best_s2 = value, prior.clone(), s2
    if best_prior is None:
        raise NonFiniteError("every grid point gave a non-finite validation NLL")
    if best_s2 is not None:
        la.sigma_noise = float(best_s2) ** 0.5
        best_prior = best_prior / best_s2
    la.prior_precision = best_prior
    return la.prior_precision


def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> float:
    r"""Mean Gaussian NLL :math:`\tfrac12\log(2\pi v) + (y-\mu)^2/(2v)` over all entries."""
    from bayescurv.metrics import gaussian_nll as nll

    return nll(mean.reshape(-1), var.reshape(-1), y.reshape(-1))


__all__ = ["OperatorGP", "tune_prior_precision", "CHUNK_ELEMENTS"]
