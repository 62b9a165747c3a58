r"""Prior precision handling and marginal-likelihood optimization.

The prior is :math:`N(0, diag(\delta)^{-1})` with :math:`\delta` a scalar, one value per
*layer* (module owning posterior parameters: weight and bias share it), one per parameter
*tensor* (weights and biases apart; laplace-torch's "layerwise") or one per parameter. A
prior of ``G`` values is expanded to the ``P`` entries by a *group index* ``(P,)``
(:func:`layer_index` or :func:`tensor_index`). The posterior precision
:math:`\Lambda = c H + diag(\delta)` is rebuilt cheaply for every candidate
:math:`(\delta, c)`: the structured operators keep their eigendecompositions, so a log
determinant costs ``O(P)`` for diagonal, Kronecker (per-layer :math:`\delta`) and dense
(scalar :math:`\delta`) curvature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, NonFiniteError, ShapeError
from bayescurv.linalg import BlockDiagonal, PSDOperator
from bayescurv.params import ParamSet

if TYPE_CHECKING:
    from bayescurv.laplace.posterior import Laplace

GRANULARITIES = ("scalar", "layer", "tensor", "parameter")


def layer_index(params: ParamSet) -> Tensor:
    """``(P,)`` index of the layer (module, in :meth:`ParamSet.modules` order) of every
    entry of the flat parameter vector; a tied parameter belongs to its first module."""
    idx = torch.full((params.numel,), -1, dtype=torch.long)
    for layer, (_, _, owned) in enumerate(params.modules()):
        for _, i in owned:
            sl = params.slice_of(i)
            if idx[sl.start] < 0:
                idx[sl] = layer
    return idx.to(params.device)


def tensor_index(params: ParamSet) -> Tensor:
    """``(P,)`` index of the parameter tensor (in :class:`ParamSet` order) of every entry of
    the flat parameter vector."""
    counts = torch.tensor([p.numel() for p in params.params])
    return torch.repeat_interleave(torch.arange(len(counts)), counts).to(params.device)


def group_index(prior: Tensor, layers: Tensor, tensors: Tensor) -> Tensor:
    """The group index that expands ``prior`` to the ``P`` entries: per layer when it has one
    value per layer (also when that count equals the number of tensors: then every layer
    holds one tensor and both groupings coincide up to order), per tensor when it has one
    value per tensor; ``layers`` otherwise (scalar and per-parameter priors ignore it)."""
    num_layers = int(layers.max()) + 1 if layers.numel() else 0
    num_tensors = int(tensors.max()) + 1 if tensors.numel() else 0
    if prior.dim() == 1 and prior.numel() == num_tensors and prior.numel() != num_layers:
        return tensors
    return layers


def check_prior(
    value, num_params: int, num_layers: int, dtype, device, allow_grad: bool = False,
    num_tensors: int | None = None,
) -> Tensor:
    """Validate a prior precision: positive, finite, shape ``()``, ``(num_layers,)``,
    ``(num_tensors,)`` or ``(num_params,)``."""
    t = value if torch.is_tensor(value) else torch.as_tensor(value, dtype=dtype)
    t = t.to(dtype=dtype, device=device)
    if not allow_grad:
        t = t.detach()
    if t.dim() == 1 and t.numel() == 1:
        t = t.reshape(())
    sizes = (num_layers, num_params) if num_tensors is None else (
        num_layers, num_tensors, num_params)
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in sizes):
        per_tensor = "" if num_tensors is None else f", one per tensor ({num_tensors})"
        raise ShapeError(
            f"prior_precision must be a scalar, one value per layer ({num_layers}){per_tensor} "
            f"or one per parameter ({num_params}); got shape {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise NonFiniteError("prior_precision contains NaN or Inf")
    if (t <= 0).any():
        raise InvalidArgumentError("prior_precision must be positive")
    return t


def _is_per_parameter(prior: Tensor, index: Tensor) -> bool:
    return prior.numel() == index.numel() and prior.numel() != int(index.max()) + 1


def expand_prior(prior: Tensor, index: Tensor) -> Tensor:
    """Prior precision as a ``(P,)`` vector. Per-layer values are repeated segment-wise when
    the layers are contiguous in the flat order (the usual case), whose backward is a
    segment sum; a gather's backward scatters P values into a few slots, far slower."""
    if prior.dim() == 0:
        return prior.expand(index.numel())
    if _is_per_parameter(prior, index):
        return prior
    if bool((index[1:] >= index[:-1]).all()):
        counts = torch.bincount(index, minlength=prior.numel())
        return torch.repeat_interleave(prior, counts, output_size=index.numel())
    return prior[index]


def log_prior(prior: Tensor, theta: Tensor, index: Tensor) -> Tensor:
    r""":math:`\log N(\theta; 0, diag(\delta)^{-1}) + \tfrac{P}{2}\log 2\pi
    = -\tfrac12 \theta^\top diag(\delta)\theta + \tfrac12 \log\det diag(\delta)`,
    computed per layer for scalar and per-layer priors (no length-``P`` vector in the graph,
    so one evidence step costs ``O(L)`` here)."""
    sq = theta.detach() ** 2
    if prior.dim() == 0:
        return -0.5 * prior * sq.sum() + 0.5 * theta.numel() * torch.log(prior)
    if _is_per_parameter(prior, index):
        return -0.5 * (prior * sq).sum() + 0.5 * torch.log(prior).sum()
    per_layer = torch.zeros(prior.numel(), dtype=sq.dtype, device=sq.device).index_add_(
        0, index, sq)
    counts = torch.bincount(index, minlength=prior.numel()).to(sq.dtype)
    return -0.5 * (prior * per_layer).sum() + 0.5 * (counts * torch.log(prior)).sum()


def add_prior(h: PSDOperator, prior: Tensor, index: Tensor, num_layers: int) -> PSDOperator:
    """:math:`H + diag(\\delta)`, keeping Kronecker blocks exact for per-layer priors."""
    if prior.dim() == 0:
        return h.add_diagonal(prior)
    per_layer = prior.numel() == num_layers and not (
        prior.numel() == index.numel() and num_layers != index.numel()
    )
    if per_layer and num_layers == 1:  # one layer: a scalar shift keeps Dense's eigenbasis
        return h.add_diagonal(prior.reshape(()))
    if per_layer and isinstance(h, BlockDiagonal) and h.num_blocks == num_layers:
        return h.add_diagonal_per_block(prior)
    return h.add_diagonal(expand_prior(prior, index))


def _initial(la: Laplace, granularity: str) -> Tensor:
    cur = la._prior  # internal dtype: the evidence is optimized in float64 for float32 models
    size = {"scalar": 0, "layer": la.num_layers, "tensor": la.num_tensors,
            "parameter": la.num_params}[granularity]
    if size == 0:
        return cur.mean().reshape(())
    if cur.dim() == 1 and cur.numel() == size:
        return cur.clone()
    return la.prior_diagonal().mean().expand(size).clone() if cur.dim() else cur.expand(
        size).clone()


def optimize(
    la: Laplace, granularity: str, n_steps: int, lr: float, tune_sigma: bool, verbose: bool
) -> Tensor:
    """Maximize the log evidence over log prior precision (and log noise) with Adam."""
    if granularity not in GRANULARITIES:
        raise InvalidArgumentError(
            f"unknown granularity {granularity!r}; use one of {GRANULARITIES}"
        )
    if tune_sigma and la.likelihood.name != "regression":
        raise InvalidArgumentError("tune_sigma_noise applies to likelihood='regression' only")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise InvalidArgumentError(f"n_steps must be a positive integer, got {n_steps}")
    log_prior = _initial(la, granularity).log().clone().requires_grad_(True)
    variables = [log_prior]
    log_sigma = la._sigma.log().clone().requires_grad_(tune_sigma)
    if tune_sigma:
        variables.append(log_sigma)
    opt = torch.optim.Adam(variables, lr=lr)
    best = (-float("inf"), None, None)
    for step in range(n_steps):
        opt.zero_grad()
        lml = la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        if not torch.isfinite(lml):
            raise NonFiniteError(
                f"the log marginal likelihood became non-finite at step {step}; try a "
                "smaller lr"
            )
        if lml.item() > best[0]:
            best = (lml.item(), log_prior.detach().clone(), log_sigma.detach().clone())
        (-lml).backward()
        opt.step()
        if verbose and step % 10 == 0:
            print(f"step {step:4d}  log evidence {lml.item():.4f}")
    with torch.no_grad():
        lml = la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp()).item()
    if lml >= best[0]:
        best = (lml, log_prior.detach(), log_sigma.detach())
    la.prior_precision = best[1].exp()
    if tune_sigma:
        la.sigma_noise = best[2].exp()
    return la.prior_precision


def _metric_fn(la: Laplace, metric):
    from bayescurv import metrics

    if callable(metric):
        return metric
    if la.likelihood.name == "regression":
        if metric != "nll":
            raise InvalidArgumentError(
                f"regression grid search supports metric='nll' (Gaussian predictive NLL) or a "
                f"callable; got {metric!r}"
            )
        return lambda pred, y: metrics.gaussian_nll(pred[0], pred[1], y)
    table = {
        "nll": metrics.nll,
        "ece": metrics.ece,
        "brier": lambda p, y: float(_brier(p, y)),
    }
    if metric not in table:
        raise InvalidArgumentError(f"unknown metric {metric!r}; use one of {sorted(table)}")
    return table[metric]


def _brier(p: Tensor, y: Tensor) -> Tensor:
    if p.dim() == 1:
        return ((p - y.to(p.dtype)) ** 2).mean()
    onehot = torch.nn.functional.one_hot(y.long(), p.shape[-1]).to(p.dtype)
    return ((p - onehot) ** 2).sum(-1).mean()


def gridsearch(la: Laplace, val_loader, metric, grid, link: str, verbose: bool) -> Tensor:
    """Scalar prior precision minimizing ``metric`` of the GLM predictive on
    ``val_loader``; the prior is set afresh at every grid point (nothing carries over)."""
    from bayescurv import batches

    fn = _metric_fn(la, metric)
    if grid is None:
        grid = torch.logspace(-4, 4, 21, dtype=la.params.dtype)
    grid = torch.as_tensor(grid, dtype=la.params.dtype).reshape(-1)
    if grid.numel() == 0 or (grid <= 0).any():
        raise InvalidArgumentError("grid must hold positive prior precisions")
    data = list(batches.iterate(val_loader, device=la.params.device, dtype=la.params.dtype,
                                batch_dim=la.batch_dim))
    ys = torch.cat([y for _, y in data])
    best_value, best_prior = float("inf"), None
    for prior in grid:
        la.prior_precision = prior
        preds = [la.predict(x, link=link) for x, _ in data]
        if la.likelihood.name == "regression":
            pred = (torch.cat([p[0] for p in preds]), torch.cat([p[1] for p in preds]))
        else:
            pred = torch.cat(preds)
        value = float(fn(pred, ys))
        if verbose:
            print(f"prior {float(prior):.3g}  {metric if isinstance(metric, str) else 'metric'}"
                  f" {value:.4f}")
        if value < best_value:
            best_value, best_prior = value, prior.clone()
    if best_prior is None:
        raise NonFiniteError("every grid point gave a non-finite metric")
    la.prior_precision = best_prior
    return la.prior_precision
