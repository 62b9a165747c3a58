"""Likelihoods: everything the curvature engine and the posteriors need to know of a loss.

:mod:`.base` holds the interface (:class:`Likelihood`), the registry and the classic ones
(Gaussian regression, softmax classification, binary, Poisson); :mod:`.heteroscedastic`
Gaussian regression with a per-input noise; :mod:`.binary` multi-label classification and
Bradley–Terry reward modelling; :mod:`.dense` per-position (segmentation, per-token,
image-to-image) outputs. See ``docs/likelihoods.md`` for the math.
"""

from bayescurv.likelihoods.base import (
    LIKELIHOODS,
    Bernoulli,
    Categorical,
    Gaussian,
    Likelihood,
    Poisson,
    check_finite_outputs,
    class_indices,
    get_likelihood,
    register,
    unimplemented,
)
from bayescurv.likelihoods.binary import MultiLabel, PairwiseReward, Reward, preference_pairs
from bayescurv.likelihoods.dense import (
    DenseBernoulli,
    DenseCategorical,
    DenseGaussian,
    DenseMultiLabel,
    PerPosition,
)
from bayescurv.likelihoods.heteroscedastic import (
    Heteroscedastic,
    HeteroscedasticMeanVar,
    NaturalHead,
    StudentT,
)

__all__ = [
    "Likelihood",
    "Gaussian",
    "Categorical",
    "Bernoulli",
    "Poisson",
    "Heteroscedastic",
    "HeteroscedasticMeanVar",
    "StudentT",
    "NaturalHead",
    "MultiLabel",
    "Reward",
    "PairwiseReward",
    "preference_pairs",
    "PerPosition",
    "DenseCategorical",
    "DenseGaussian",
    "DenseMultiLabel",
    "DenseBernoulli",
    "get_likelihood",
    "register",
    "unimplemented",
    "check_finite_outputs",
    "class_indices",
    "LIKELIHOODS",
]
