"""bayescurv.bo raises the library's errors (``bayescurv.errors``) or BoTorch's, never a bare
built-in: checked on the source of every module and, per argument, on the raised types (which
still subclass the built-in a caller may catch)."""

from __future__ import annotations

import ast
import pathlib

import botorch.exceptions.errors as botorch_errors
import pytest
import torch

import bayescurv.bo
import bayescurv.errors as errors
from bayescurv.bo import FourierFeatures, LaplaceModel, NTKKernel, default_network
from bayescurv.bo.ard import fit_lengthscales
from bayescurv.bo.ntk import LinearizedGP, prior_groups
from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.params import select

DT = torch.float64
BO = pathlib.Path(bayescurv.bo.__file__).parent
#: raised deliberately: GPyTorch / BoTorch signal an optional feature that a model lacks so
NOT_IMPLEMENTED = {"NotImplementedError"}
ALLOWED = set(errors.__all__) | {
    name for name in dir(botorch_errors) if name.endswith("Error")} | NOT_IMPLEMENTED


def _raised_names(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, name)`` of every ``raise Name(...)`` / ``raise Name`` in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name):
                out.append((node.lineno, exc.id))
            elif isinstance(exc, ast.Attribute):
                out.append((node.lineno, exc.attr))
    return out


@pytest.mark.parametrize("path", sorted(BO.glob("*.py")), ids=lambda p: p.name)
def test_no_bare_builtin_raises(path):
    bad = [(line, name) for line, name in _raised_names(path) if name not in ALLOWED]
    assert not bad, f"{path.name}: raise a bayescurv.errors class instead of {bad}"


def test_the_scan_sees_raises():
    assert ("InvalidArgumentError" in {n for _, n in _raised_names(BO / "model.py")})


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    X = torch.rand(n, 2, generator=g, dtype=DT)
    return X, torch.sin(3 * X).sum(-1, keepdim=True)


FAST = dict(hidden=(4,), steps=5, marglik_steps=1)


@pytest.mark.parametrize("kwargs, error, builtin, match", [
    (dict(structure="ntk", subset="last_layer", **FAST), InvalidArgumentError, ValueError,
     "subset"),
    (dict(prior_mean="map", **FAST), InvalidArgumentError, ValueError, "prior_mean"),
    (dict(evidence="exact"), InvalidArgumentError, ValueError, "evidence"),
    (dict(evidence="linearized", structure="kfac", **FAST), InvalidArgumentError, ValueError,
     "structure='full'"),
    (dict(structure="ntk", evidence="laplace", **FAST), InvalidArgumentError, ValueError,
     "linearized"),
    (dict(noise="loud", **FAST), InvalidArgumentError, ValueError, "noise"),
    (dict(lengthscales="iso"), InvalidArgumentError, ValueError, "lengthscales"),
    (dict(hidden=(4,), activation="sine"), InvalidArgumentError, ValueError, "activation"),
], ids=["ntk-subset", "prior_mean", "evidence", "linearized-kfac", "ntk-laplace", "noise",
        "lengthscales", "activation"])
def test_laplace_model_argument_errors(kwargs, error, builtin, match):
    X, Y = _data()
    with pytest.raises(error, match=match) as info:
        LaplaceModel(X, Y, **kwargs)
    assert isinstance(info.value, builtin)


def test_component_argument_errors():
    X, Y = _data()
    with pytest.raises(InvalidArgumentError, match="activation"):
        default_network(2, 1, activation="sine")
    with pytest.raises(InvalidArgumentError, match="positive"):
        FourierFeatures(0, 8)
    with pytest.raises(ShapeError, match="one per input"):
        FourierFeatures(2, 8, lengthscale=[0.5, 1.0, 2.0])
    with pytest.raises(InvalidArgumentError, match="positive"):
        FourierFeatures(2, 8, lengthscale=[0.5, -1.0])
    with pytest.raises(InvalidArgumentError, match="min_noise"):
        fit_lengthscales(FourierFeatures(2, 8).to(DT), X, Y, min_noise=0.0)
    with pytest.raises(InvalidArgumentError, match="Laplace"):
        NTKKernel(object())
    ps = select(default_network(2, 1, (4,)).to(DT), "all")
    with pytest.raises(InvalidArgumentError, match="prior_granularity"):
        prior_groups(ps, 2, "tensor")
    groups = prior_groups(ps, 2, "scalar")
    with pytest.raises(InvalidArgumentError, match="space"):
        LinearizedGP(ps, ps.vector(), groups, torch.ones(1, dtype=DT), torch.tensor(0.1), X,
                     Y, space="function")
