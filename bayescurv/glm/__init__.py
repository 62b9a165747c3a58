"""Probabilistic GLM solvers: Laplace-Newton with a probabilistic linear solver whose
covariance includes its own approximation error (IterGLM / IterNCGP)."""

from bayescurv.glm.kernels import (
    EmpiricalNTK,
    FeatureKernel,
    GLMKernel,
    KernelFunction,
    OperatorKernel,
)
from bayescurv.glm.likelihoods import Binomial
from bayescurv.glm.model import GLMPrediction, IterGLM
from bayescurv.glm.solver import POLICIES, ActionState, Policy

__all__ = ["IterGLM", "GLMPrediction", "GLMKernel", "KernelFunction", "OperatorKernel",
           "FeatureKernel", "EmpiricalNTK", "Binomial", "POLICIES", "ActionState", "Policy"]
