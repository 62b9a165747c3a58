r"""Matrix-free curvature products over a data stream, built on :mod:`torch.func`.

Loss convention (see :mod:`bayescurv.batches`): :math:`L(\theta) = \sum_n \ell_n(\theta)` with
:math:`\ell_n = -\log p(y_n | f(x_n; \theta))`, a SUM over the data; ``reduction="mean"``
divides every curvature by the number of data points :math:`N`. With
:math:`J_n = \partial f(x_n;\theta) / \partial\theta` (``C x P``),
:math:`H_n = \nabla^2_f \ell_n` and :math:`g_n = \nabla_\theta \ell_n = J_n^\top r_n`,
:math:`r_n = \nabla_f \ell_n`, the operators are

- ``"ggn"``: :math:`G = \sum_n J_n^\top H_n J_n`, applied as
  :math:`J^\top (S (S^\top (J v)))` with the likelihood's exact square root
  :math:`S_n S_n^\top = H_n` (equal to the Fisher for the canonical links here);
- ``"hessian"``: :math:`\nabla^2_\theta L`, forward-over-reverse (``jvp`` of ``grad``);
- ``"ef"``: the empirical Fisher :math:`\sum_n g_n g_n^\top`, applied as
  :math:`J^\top (r \odot (r^\top J v))` (no per-sample parameter gradients).

Per batch the network is linearised once (one ``vjp``); the ``k`` columns of a matrix are
pushed through it together with ``torch.func.vmap`` (Jacobian-vector products under
``vmap`` of ``jvp``, transposed products under ``vmap`` of the ``vjp`` function).

Index conventions: ``B`` batch, ``C`` network outputs, ``P`` parameters in the set (the
flat order of :class:`~bayescurv.params.ParamSet`), ``k`` columns.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bayescurv import batches
from bayescurv.deprecation import UNSET, renamed
from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.likelihoods import Likelihood, check_finite_outputs, get_likelihood
from bayescurv.linalg import internal_dtype
from bayescurv.params import ParamSet, select, select_output

KINDS = ("ggn", "hessian", "ef")

Inputs = Tensor | dict[str, Tensor]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _resolve_params(model: nn.Module, params: str | Iterable[str] | ParamSet) -> ParamSet:
    """A :class:`ParamSet` of ``model`` from a set or a subset specification."""
    if isinstance(params, ParamSet):
        if params.model is not model:
            raise InvalidArgumentError(
                "the ParamSet was selected from a different model; build it with "
                "bayescurv.params.select(model, ...) on the model passed here"
            )
        return params
    return select(model, params)


def _call(params: ParamSet, theta: Tensor, x: Inputs) -> Tensor:
    """``f(x; theta)``; dict inputs are the model's keyword arguments."""
    if isinstance(x, dict):
        return params.functional_call(theta, **x)
    return params.functional_call(theta, x)


def _flat_outputs(f: Tensor) -> Tensor:
    """Outputs as ``(B, C)``: ``(B,)`` gets a unit output axis, trailing axes are flattened."""
    if f.dim() == 0:
        raise ShapeError("the model returned a scalar; it must return (batch, outputs)")
    return f.reshape(f.shape[0], -1)


def _likelihood_outputs(f: Tensor) -> Tensor:
    """Outputs as the likelihood wants them: ``(B,)`` becomes ``(B, 1)``; other shapes are
    left for the likelihood to accept or reject (it raises for more than two axes)."""
    return f.unsqueeze(-1) if f.dim() == 1 else f


def _as_columns(V: Tensor, numel: int, what: str) -> tuple[Tensor, bool]:
    """``V`` as ``(P, k)`` plus whether it was a vector; raise :class:`ShapeError`."""
    if not torch.is_tensor(V):
        raise ShapeError(f"{what} must be a tensor, got {type(V).__name__}")
    if V.dim() == 1 and V.shape[0] == numel:
        return V.unsqueeze(-1), True
    if V.dim() == 2 and V.shape[0] == numel:
        return V, False
    raise ShapeError(
        f"{what} must have shape (P,) or (P, k) with P = {numel} parameters; got {tuple(V.shape)}"
    )


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise InvalidArgumentError(f"chunk_size must be a positive int or None, got {chunk_size}")


# ------------------------------------------------------------------------------------------
# Jacobian products of the network
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def jacobian_vector_product(
    model: nn.Module, params: str | Iterable[str] | ParamSet, x: Inputs, v: Tensor
) -> Tensor:
    r"""``J v`` with :math:`J = \partial f(x;\theta)/\partial\theta` at the current parameters.

    Args:
        model: the network; its training flag is respected (use ``eval()`` for a
            deterministic linearisation).
        params: a :class:`ParamSet` of ``model`` or a subset for :func:`select`.
        x: a batch of inputs (a tensor, or a dict of keyword inputs).
        v: ``(P,)`` or ``(P, k)``.

    Returns:
        ``(B, C)`` for a vector, ``(B, C, k)`` for a matrix; outputs are flattened to
        ``(B, C)`` (``(B,)`` gives ``C = 1``).
    """
    ps = _resolve_params(model, params)
    V, is_vec = _as_columns(v, ps.numel, "v")
    V = V.to(device=ps.device, dtype=ps.dtype)
    theta = ps.vector()

    def fwd(t: Tensor) -> Tensor:
        return _flat_outputs(_call(ps, t, x))

    def jvp_col(col: Tensor) -> Tensor:
        return torch.func.jvp(fwd, (theta,), (col,))[1]

    if is_vec:
        return jvp_col(V[:, 0])
    out = torch.func.vmap(jvp_col, randomness="same")(V.T)  # (k, B, C)
    return out.permute(1, 2, 0)


@torch.no_grad()
def vector_jacobian_product(
    model: nn.Module, params: str | Iterable[str] | ParamSet, x: Inputs, u: Tensor
) -> Tensor:
    r"""``Jᵀ u`` (:math:`\sum_{b,c} u_{bc} \partial f_{bc} / \partial\theta`).

    Args:
        u: ``(B, C)`` giving ``(P,)``, or ``(B, C, k)`` giving ``(P, k)``; ``C`` is the
            flattened output size (see :func:`jacobian_vector_product`).
    """
    ps = _resolve_params(model, params)
    theta = ps.vector()
    f, vjp_fn = torch.func.vjp(lambda t: _flat_outputs(_call(ps, t, x)), theta)
    if u.dim() not in (2, 3) or tuple(u.shape[:2]) != tuple(f.shape):
        raise ShapeError(
            f"u must have shape {tuple(f.shape)} (batch, outputs) or (batch, outputs, k); "
            f"got {tuple(u.shape)}"
        )
    u = u.to(device=f.device, dtype=f.dtype)
    if u.dim() == 2:
        return vjp_fn(u)[0]
    return torch.func.vmap(lambda c: vjp_fn(c)[0])(u.permute(2, 0, 1)).T


@torch.no_grad()
def jacobian(
    model: nn.Module,
    params: str | Iterable[str] | ParamSet,
    x: Inputs,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Dense Jacobian :math:`\partial f_{bc}/\partial\theta_p`, shape ``(B, C, P)``.

    ``B*C`` transposed products (one-hot cotangents) through a single linearisation,
    ``chunk_size`` of them at a time (all at once by default). Meant for small networks
    and tests: the result holds ``B*C*P`` numbers.
    """
    _check_chunk(chunk_size)
    ps = _resolve_params(model, params)
    theta = ps.vector()
    f, vjp_fn = torch.func.vjp(lambda t: _flat_outputs(_call(ps, t, x)), theta)
    B, C = f.shape
    m = B * C
    step = m if chunk_size is None else chunk_size
    rows = []
    vjp_many = torch.func.vmap(lambda c: vjp_fn(c)[0])
    for start in range(0, m, step):
        idx = torch.arange(start, min(start + step, m), device=f.device)
        E = torch.zeros(len(idx), m, device=f.device, dtype=f.dtype)
        E[torch.arange(len(idx), device=f.device), idx] = 1.0
        rows.append(vjp_many(E.reshape(len(idx), B, C)))
    return torch.cat(rows).reshape(B, C, ps.numel)


# ------------------------------------------------------------------------------------------
# the curvature operator
# ------------------------------------------------------------------------------------------
class CurvatureLinearOperator:
    r"""The GGN, Hessian or empirical Fisher of :math:`L(\theta)=\sum_n -\log p(y_n|f(x_n;\theta))`
    as a ``(P, P)`` symmetric linear operator, applied by streaming over ``data``.

    Args:
        model: the network (outputs ``(B, C)`` or ``(B,)``).
        likelihood: a likelihood name (``"regression"``, ``"classification"``, ...) or a
            :class:`~bayescurv.likelihoods.Likelihood`.
        data: an iterable of ``(x, y)`` or dict batches, iterated anew at every product
            (a DataLoader or a list; not a one-shot generator).
        subset: which parameters: ``"all"``, ``"last_layer"``, a list of names, or a
            :class:`ParamSet` (as ``Laplace(subset=...)``; resolved into :attr:`params`).
        kind: ``"ggn"``, ``"hessian"`` or ``"ef"`` (see the module docstring).
        reduction: ``"sum"`` (default) or ``"mean"`` (divide by the number of data points).
        x_key, y_key: keys of dict batches (see :func:`bayescurv.batches.split_batch`).
        progress: show a tqdm bar over batches.
        chunk_size: push at most this many columns at once through ``vmap`` (bounds the
            memory of a ``matmat`` to ``chunk_size`` linearised copies); ``None``: all.
        params: deprecated name of ``subset`` (a ``FutureWarning``).

    The model is evaluated in its current mode; the training flag is never changed.
    Dropout in training mode makes every product random (and ``J`` and ``Jᵀ`` see
    different masks); batch norm in training mode couples the batch and updates running
    statistics, which ``torch.func`` cannot do. Call ``model.eval()`` first.

    When ``torch.distributed`` is initialized, each rank streams its own ``data`` and
    the sums (and ``N`` for ``"mean"``) are all-reduced, so every rank gets the product
    over the union of the ranks' data. Products are then collectives: every rank must
    call them, with at least one batch of its own.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        data: Iterable[Any],
        subset: str | Iterable[str] | ParamSet = "all",
        kind: str = "ggn",
        reduction: str = "sum",
        x_key: str = "x",
        y_key: str = "y",
        progress: bool = False,
        chunk_size: int | None = None,
        *,
        params: str | Iterable[str] | ParamSet = UNSET,
    ) -> None:
        subset = renamed(subset, params, "subset", "params", "CurvatureLinearOperator")
        if kind not in KINDS:
            raise InvalidArgumentError(f"unknown curvature kind {kind!r}; use one of {KINDS}")
        batches.check_reduction(reduction)
        _check_chunk(chunk_size)
        if isinstance(data, Tensor):
            raise InvalidArgumentError(
                "data must be an iterable of (x, y) batches such as a DataLoader, not a tensor"
            )
        if iter(data) is data:
            raise InvalidArgumentError(
                "data is a one-shot iterator (a generator?); every product streams the data "
                "again, so pass a re-iterable such as a list of batches or a DataLoader"
            )
        self.model = model
        self.likelihood = get_likelihood(likelihood)
        self.data = data
        self.params = _resolve_params(model, subset)
        self.kind = kind
        self.reduction = reduction
        self.x_key = x_key
        self.y_key = y_key
        self.progress = progress
        self.chunk_size = chunk_size
        self._warn_stochastic()

    def _warn_stochastic(self) -> None:
        stochastic = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
        bad = [n for n, m in self.model.named_modules() if m.training and isinstance(m, stochastic)]
        if bad:
            warnings.warn(
                f"modules {bad[:5]} are in training mode: dropout makes curvature products "
                "random and batch norm in training mode is not supported by torch.func; "
                "call model.eval() before building the operator",
                UserWarning,
                stacklevel=3,
            )

    # --------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.params.numel, self.params.numel)

    @property
    def dtype(self) -> torch.dtype:
        return self.params.dtype

    @property
    def device(self) -> torch.device:
        return self.params.device

    def __repr__(self) -> str:
        return (
            f"CurvatureLinearOperator(kind={self.kind!r}, likelihood={self.likelihood.name!r}, "
            f"P={self.params.numel}, reduction={self.reduction!r})"
        )

    # --------------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for ``v`` of shape ``(P,)``."""
        if not torch.is_tensor(v) or v.dim() != 1:
            shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise ShapeError(f"matvec needs a vector of shape ({self.params.numel},); got {shape}")
        return self.matmat(v.unsqueeze(-1)).squeeze(-1)

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``(P, k)`` (one pass over the data for all columns)."""
        if not torch.is_tensor(V) or V.dim() != 2:
            shape = tuple(V.shape) if torch.is_tensor(V) else type(V).__name__
            raise ShapeError(
                f"matmat needs a matrix of shape ({self.params.numel}, k); got {shape}"
            )
        V, _ = _as_columns(V, self.params.numel, "V")
        return self._matmat(V.to(device=self.device, dtype=self.dtype), self.chunk_size)

    def __matmul__(self, other: Tensor) -> Tensor:
        if torch.is_tensor(other) and other.dim() == 1:
            return self.matvec(other)
        return self.matmat(other)

    def to_dense(self, chunk_size: int | None = 64) -> Tensor:
        """The ``(P, P)`` matrix: ``A I`` in one data pass, ``chunk_size`` columns through
        ``vmap`` at a time (``None``: all ``P`` at once)."""
        _check_chunk(chunk_size)
        eye = torch.eye(self.params.numel, device=self.device, dtype=self.dtype)
        dense = self._matmat(eye, chunk_size)
        return 0.5 * (dense + dense.T)

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X, dtype=np.float64)
            vec = X.ndim == 1
            T = torch.as_tensor(X.reshape(X.shape[0], -1), device=self.device, dtype=self.dtype)
            out = self.matmat(T).detach().to(device="cpu", dtype=torch.float64).numpy()
            return out[:, 0] if vec else out

        return LinearOperator(
            self.shape, matvec=mm, rmatvec=mm, matmat=mm, rmatmat=mm, dtype=np.float64
        )

    # --------------------------------------------------------------------------------
    @torch.no_grad()
    def _matmat(self, V: Tensor, chunk_size: int | None) -> Tensor:
        # the sum over batches in float64 for float32/bf16/fp16 models
        out = torch.zeros_like(V, dtype=internal_dtype(V.dtype))
        n = torch.zeros((), device=self.device, dtype=torch.int64)  # exact count
        stream = batches.iterate(
            self.data, device=self.device, dtype=self.dtype, x_key=self.x_key, y_key=self.y_key
        )
        if self.progress:
            from tqdm.auto import tqdm

            stream = tqdm(stream, desc=f"{self.kind} products", leave=False)
        product = {"ggn": self._batch_ggn, "hessian": self._batch_hessian, "ef": self._batch_ef}
        for x, y in stream:
            out.add_(product[self.kind](x, y, V, chunk_size))
            n += batches.batch_size(x)
        batches.all_reduce_([out, n])
        if self.reduction == "mean":
            out.div_(n)
        return out.to(V.dtype)

    def _fwd(self, x: Inputs) -> Callable[[Tensor], Tensor]:
        return lambda t: _likelihood_outputs(_call(self.params, t, x))

    def _linearize(self, x: Inputs, y: Tensor):
        """``f``, validated targets and the transposed-Jacobian function of one batch."""
        theta = self.params.vector()
        f, vjp_fn = torch.func.vjp(self._fwd(x), theta)
        check_finite_outputs(f)
        f, y = self.likelihood.check(f, y)
        return theta, f, y, vjp_fn

    def _jv(self, x: Inputs, theta: Tensor, V: Tensor, chunk_size: int | None) -> Tensor:
        """``J V`` as ``(k, B, C)``."""
        fwd = self._fwd(x)
        return torch.func.vmap(
            lambda v: torch.func.jvp(fwd, (theta,), (v,))[1],
            chunk_size=chunk_size,
            randomness="same",
        )(V.T)

    @staticmethod
    def _jtu(vjp_fn, U: Tensor, chunk_size: int | None) -> Tensor:
        """``Jᵀ U`` for ``U`` of shape ``(k, B, C)``, as ``(P, k)``."""
        return torch.func.vmap(lambda u: vjp_fn(u)[0], chunk_size=chunk_size)(U).T

    def _dual_forward(self, x: Inputs, v: Tensor) -> tuple[Tensor, Tensor]:
        """One forward pass with forward-mode dual parameters ``θ + ε v``: the outputs ``f``
        (with their reverse-mode graph to the parameters) and ``J v`` together."""
        import torch.autograd.forward_ad as fwad

        tangents = self.params.unflatten(v)
        with fwad.dual_level():
            duals = {n: fwad.make_dual(p, t) for n, p, t in
                     zip(self.params.names, self.params.params, tangents)}
            args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
            out = torch.func.functional_call(self.params.model, duals, args, kwargs)
            out = select_output(out, self.params.output_key, x)
            f, jv = fwad.unpack_dual(_likelihood_outputs(out))
        return f, jv.detach()

    def _single_column(self, x: Inputs, y: Tensor, v: Tensor, weight) -> Tensor:
        """``Jᵀ weight(f, y, J v)`` for one vector: one dual forward, one backward (about
        half the cost of the linearize-then-vmap route for a single column)."""
        f, jv = self._dual_forward(x, v)
        check_finite_outputs(f)
        fc, yc = self.likelihood.check(f, y)
        u = weight(fc.detach(), yc, jv.reshape(fc.shape))
        grads = torch.autograd.grad(fc, self.params.params, u, allow_unused=True)
        return torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, self.params.params)
        ]).unsqueeze(-1)

    def _batch_ggn(self, x: Inputs, y: Tensor, V: Tensor, chunk_size: int | None) -> Tensor:
        if V.shape[1] == 1:
            def weight(f, y, jv):
                s = self.likelihood.hessian_sqrt(f)
                return torch.einsum("bck,bdk,bd->bc", s, s, jv)

            with torch.enable_grad():
                return self._single_column(x, y, V[:, 0], weight)
        theta, f, y, vjp_fn = self._linearize(x, y)
        S = self.likelihood.hessian_sqrt(f)  # (B, C, K), S Sᵀ = H
        JV = self._jv(x, theta, V, chunk_size).reshape(V.shape[1], *f.shape)
        HJV = torch.einsum("bck,bdk,nbd->nbc", S, S, JV)
        return self._jtu(vjp_fn, HJV, chunk_size)

    def _batch_ef(self, x: Inputs, y: Tensor, V: Tensor, chunk_size: int | None) -> Tensor:
        if V.shape[1] == 1:
            def weight(f, y, jv):
                r = self.likelihood.gradient(f, y)
                return (r * jv).sum(-1, keepdim=True) * r

            with torch.enable_grad():
                return self._single_column(x, y, V[:, 0], weight)
        theta, f, y, vjp_fn = self._linearize(x, y)
        R = self.likelihood.gradient(f, y)  # (B, C) per-sample output gradients
        JV = self._jv(x, theta, V, chunk_size).reshape(V.shape[1], *f.shape)
        coeff = torch.einsum("bc,nbc->nb", R, JV)  # g_nᵀ v = r_nᵀ J_n v
        return self._jtu(vjp_fn, coeff.unsqueeze(-1) * R, chunk_size)

    def _batch_hessian(self, x: Inputs, y: Tensor, V: Tensor, chunk_size: int | None) -> Tensor:
        theta = self.params.vector()
        fwd = self._fwd(x)
        with torch.no_grad():
            f = fwd(theta)
        check_finite_outputs(f)
        _, y = self.likelihood.check(f, y)
        grad = torch.func.grad(lambda t: self.likelihood.nll(fwd(t), y))
        HV = torch.func.vmap(
            lambda v: torch.func.jvp(grad, (theta,), (v,))[1],
            chunk_size=chunk_size,
            randomness="same",
        )(V.T)
        return HV.T


__all__ = [
    "CurvatureLinearOperator",
    "jacobian_vector_product",
    "vector_jacobian_product",
    "jacobian",
    "KINDS",
]
