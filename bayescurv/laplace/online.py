r"""Online marginal-likelihood training (Immer et al., 2021, "Scalable marginal likelihood
estimation for model selection in deep learning", Alg. 1).

The network's weights and the hyperparameters (prior precision, observation noise) are
learned together: gradient steps on the MAP objective

.. math:: \frac{1}{N}\Big[\sum_n -\log p(y_n|f(x_n;\theta)) + \tfrac12 \theta^\top
   diag(\delta)\,\theta\Big]

and, every ``marglik_frequency`` epochs after ``n_epochs_burnin``, a Laplace fit at the current
weights followed by at most ``n_hypersteps`` L-BFGS steps on the log evidence w.r.t. the log
hyperparameters. The weights are thereby trained under the prior the evidence selects (the
post-hoc setting lacks exactly this consistency). The model with the best evidence is kept.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from bayescurv import batches
from bayescurv.errors import InvalidArgumentError
from bayescurv.laplace.posterior import Laplace
from bayescurv.params import OutputKey


@dataclass
class MarglikResult:
    """What :func:`marglik_training` returns.

    Attributes:
        laplace: the Laplace posterior of the best-evidence model (fitted, with its tuned
            hyperparameters); ``laplace.model`` is the trained network (trained in place).
        log_marglik: the best log evidence.
        history: ``(epoch, log evidence)`` at each marglik step.
        losses: training loss per epoch.
    """

    laplace: Laplace
    log_marglik: float
    history: list[tuple[int, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def marglik_training(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: str = "classification",
    *,
    subset: str | Iterable[str] = "all",
    structure: str = "kfac",
    granularity: str = "layer",
    prior_precision: float = 1.0,
    sigma_noise: float = 1.0,
    n_epochs: int = 100,
    lr: float = 1e-3,
    lr_min: float | None = None,
    lr_hyp: float | None = None,
    n_epochs_burnin: int = 10,
    marglik_frequency: int = 5,
    n_hypersteps: int = 50,
    tune_sigma_noise: bool | None = None,
    progress: bool = False,
    output_key: OutputKey = None,
) -> MarglikResult:
    """Train ``model`` and its prior precision (and noise, for regression) by the online
    Laplace evidence. Uses Adam (cosine-decayed to ``lr_min``) for the weights and
    :meth:`Laplace.optimize_prior_precision` for the hyperparameters (``lr_hyp`` is
    deprecated and ignored: that tuner is L-BFGS with a line search). ``output_key``: how to
    read the network output of a model returning a tuple, dict or HuggingFace-style output
    (as in :class:`~bayescurv.laplace.Laplace`), used by the training steps and the fits."""
    if lr_hyp is not None:
        warnings.warn("marglik_training(lr_hyp=...) is deprecated and ignored",
                      FutureWarning, stacklevel=2)
    if n_epochs < 1 or marglik_frequency < 1 or n_hypersteps < 1 or n_epochs_burnin < 0:
        raise InvalidArgumentError(
            "n_epochs, marglik_frequency and n_hypersteps must be >= 1, n_epochs_burnin >= 0"
        )
    la = Laplace(model, likelihood, subset=subset, structure=structure,
                 prior_precision=prior_precision, sigma_noise=sigma_noise,
                 output_key=output_key)
    if tune_sigma_noise is None:
        tune_sigma_noise = la.likelihood.name == "regression"
    n = sum(batches.batch_size(x) for x, _ in batches.iterate(train_loader))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, n_epochs, eta_min=lr * 1e-2 if lr_min is None else lr_min)
    result = MarglikResult(la, -math.inf)
    best_state = None
    index = la.layer_index
    for epoch in range(1, n_epochs + 1):
        model.train()
        total = 0.0
        for x, y in batches.iterate(train_loader, device=la.params.device,
                                    dtype=la.params.dtype):
            opt.zero_grad()
            f = la.likelihood.check_outputs(la.params.forward(x))  # read with output_key
            nll = la.likelihood.nll(*la.likelihood.check(f, y))
            theta = torch.cat([p.reshape(-1) for p in la.params.params])
            delta = (la.prior_diagonal() if la.prior_precision.dim() else
                     la.prior_precision).detach().to(theta.dtype)
            if delta.dim() == 0:
                penalty = 0.5 * delta * (theta**2).sum()
            else:
                penalty = 0.5 * (delta.expand(index.numel()) * theta**2).sum()
            loss = (nll * n / batches.batch_size(x) + penalty) / n
            loss.backward()
            opt.step()
            total += loss.item() * batches.batch_size(x)
        sched.step()
        result.losses.append(total / n)
        if epoch <= n_epochs_burnin or epoch % marglik_frequency != 0:
            continue
        model.eval()
        la.fit(train_loader, progress=False)
        la.optimize_prior_precision(granularity=granularity, n_steps=n_hypersteps,
                                    tune_sigma_noise=tune_sigma_noise)
        lml = la.log_marginal_likelihood().item()
        result.history.append((epoch, lml))
        if progress:
            print(f"epoch {epoch:4d}  loss {total / n:.4f}  log evidence {lml:.2f}")
        if lml > result.log_marglik:
            result.log_marglik = lml
            best_state = (copy.deepcopy(model.state_dict()), la.prior_precision.clone(),
                          la.sigma_noise.clone())
    model.eval()
    if best_state is not None:
        model.load_state_dict(best_state[0])
        la.prior_precision = best_state[1]
        la.sigma_noise = best_state[2]
    la.fit(train_loader, progress=False)
    if best_state is None:
        result.log_marglik = la.log_marginal_likelihood().item()
    return result
