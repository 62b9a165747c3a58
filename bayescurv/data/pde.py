r"""PDE data for neural operators, generated locally (seeded, no downloads, seconds).

Each generator returns :class:`OperatorData`: input functions ``a`` ``(N, channels, *grid)``
and solutions ``u`` ``(N, 1, *grid)`` on a uniform grid, computed in float64 on the CPU (a seed
gives the same numbers everywhere) and cast to ``dtype``/``device``.

- :func:`burgers`: :math:`u_t + u u_x = \nu u_{xx}` on the periodic :math:`[0, 1)`,
  :math:`a = u(0) \sim GP(0, 625(-\Delta + 25 I)^{-2})`, target :math:`u(T)`;
- :func:`kuramoto_sivashinsky`: :math:`u_t + u u_x + u_{xx} + u_{xxxx} = 0` on the
  periodic :math:`[0, \ell)`, smooth random :math:`u(0)`, target :math:`u(T)`;
- :func:`darcy`: :math:`-\nabla\cdot(\kappa \nabla u) = f` on :math:`(0,1)^2`, :math:`u = 0` on
  the boundary, :math:`a = \kappa` a thresholded Gaussian random field (values 12 and 3),
  five-point finite differences with harmonic-mean face coefficients;
- :func:`advection_diffusion_reaction`: :math:`u_t + c\cdot\nabla u = D\Delta u
  + \rho u(1-u) + s(x)` on the periodic :math:`[0,1)^2`, inputs :math:`(u(0), c_1, c_2, s)`;
  out-of-distribution variants ``"reversed"`` (velocity :math:`-c`) and ``"source"`` (a
  Gaussian source :math:`s`).
- :func:`heat`: :math:`u_t = \nu u_{xx} + s(x)` on the periodic :math:`[0, 1)`, solved in
  closed form per Fourier mode; inputs :math:`(u(0), s)`; out-of-distribution variants
  ``"frequency"`` (initial states of higher frequency) and ``"source"`` (a non-zero source).

The periodic problems are solved pseudo-spectrally with the fourth-order exponential time
differencing Runge–Kutta scheme ETDRK4 (Cox & Matthews 2002), its coefficients by the contour
integrals of Kassam & Trefethen (2005): the stiff linear part :math:`\hat L` exactly, the
nonlinear part (2/3-rule dealiased) explicitly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError, NonFiniteError

ADR_VARIANTS = ("train", "reversed", "source")
HEAT_VARIANTS = ("train", "frequency", "source")


@dataclass
class OperatorData:
    """Input functions ``a`` ``(N, channels, *grid)`` and solutions ``u`` ``(N, 1, *grid)``;
    ``params``: the PDE's constants."""

    a: Tensor
    u: Tensor
    params: dict

    def __len__(self) -> int:
        return self.a.shape[0]

    def split(self, n_train: int) -> tuple[OperatorData, OperatorData]:
        """The first ``n_train`` samples and the rest."""
        if not 0 < n_train < len(self):
            raise InvalidArgumentError(f"n_train must be in (0, {len(self)}), got {n_train}")
        return (OperatorData(self.a[:n_train], self.u[:n_train], self.params),
                OperatorData(self.a[n_train:], self.u[n_train:], self.params))


def _check(n: int, size: int, steps: int) -> None:
    for name, v, low in (("n", n, 1), ("size", size, 8), ("steps", steps, 1)):
        if not isinstance(v, int) or v < low:
            raise InvalidArgumentError(f"{name} must be an integer >= {low}, got {v}")


def _wavenumbers(size: int, dim: int) -> list[Tensor]:
    """Integer wavenumbers of the ``rfftn`` layout, broadcastable over ``(*grid)``."""
    ks = []
    for j in range(dim):
        k = (torch.arange(size // 2 + 1) if j == dim - 1 else torch.fft.fftfreq(size, 1 / size))
        shape = [1] * dim
        shape[j] = -1
        ks.append(k.to(torch.float64).reshape(shape))
    return ks


def _dealias(size: int, dim: int) -> Tensor:
    """2/3-rule mask of the ``rfftn`` layout."""
    mask = torch.ones(())
    for k in _wavenumbers(size, dim):
        mask = mask * (k.abs() < size / 3)
    return mask.to(torch.float64)


def grf(n: int, size: int, dim: int, gen: torch.Generator, alpha: float = 2.0,
        tau: float = 5.0, sigma: float | None = None, mean: bool = True) -> Tensor:
    r"""Samples ``(n, *grid)`` of the periodic Gaussian random field on :math:`[0,1)^{dim}` with
    covariance :math:`\sigma^2 (-\Delta + \tau^2 I)^{-\alpha}` (default
    :math:`\sigma = \tau^{\alpha}`, unit variance of the constant mode; ``mean=False`` drops
    the constant mode)."""
    sigma = tau**alpha if sigma is None else sigma
    k2 = sum((2 * math.pi * k) ** 2 for k in _wavenumbers(size, dim))
    sd = sigma * (k2 + tau**2) ** (-alpha / 2)
    if not mean:
        sd = sd * (k2 > 0)
    shape = (n, *sd.shape)
    xi = torch.complex(torch.randn(shape, generator=gen, dtype=torch.float64),
                       torch.randn(shape, generator=gen, dtype=torch.float64)) / math.sqrt(2)
    coef = sd * xi
    # self-conjugate modes (zero, Nyquist) of the rfft axis are real: unit variance there
    coef[..., 0] = sd[..., 0] * xi[..., 0].real * math.sqrt(2)
    if size % 2 == 0:
        coef[..., -1] = sd[..., -1] * xi[..., -1].real * math.sqrt(2)
    return torch.fft.irfftn(coef, s=(size,) * dim, dim=tuple(range(-dim, 0)), norm="forward")


def etdrk4_coefficients(lin: Tensor, h: float, contour: int = 32) -> tuple[Tensor, ...]:
    r"""``E, E/2, Q, f1, f2, f3`` of ETDRK4 for the diagonal linear operator ``lin`` and
    step ``h`` (Kassam & Trefethen: means over ``contour`` points of a circle around each
    :math:`hL`, which avoids the cancellation of the closed forms near :math:`hL = 0`)."""
    r = torch.exp(1j * math.pi * (torch.arange(1, contour + 1, dtype=torch.float64) - 0.5)
                  / contour)
    lr = h * lin.unsqueeze(-1) + r
    e, e2 = torch.exp(h * lin), torch.exp(h * lin / 2)
    q = h * ((torch.exp(lr / 2) - 1) / lr).mean(-1)
    f1 = h * ((-4 - lr + torch.exp(lr) * (4 - 3 * lr + lr**2)) / lr**3).mean(-1)
    f2 = h * ((2 + lr + torch.exp(lr) * (-2 + lr)) / lr**3).mean(-1)
    f3 = h * ((-4 - 3 * lr - lr**2 + torch.exp(lr) * (4 - lr)) / lr**3).mean(-1)
    if not torch.is_complex(lin):  # real operator: the coefficients are real
        q, f1, f2, f3 = q.real, f1.real, f2.real, f3.real
    return e, e2, q, f1, f2, f3


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run small FFTs on one intra-op thread (restored afterwards): on a busy machine extra
    threads only wait for cores, which made the solvers up to 100x slower in our runs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def etdrk4(v: Tensor, lin: Tensor, nonlinear: Callable[[Tensor], Tensor], h: float,
           steps: int) -> Tensor:
    r"""Integrate :math:`\hat v_t = L \hat v + N(\hat v)` in Fourier space for ``steps`` steps
    of size ``h`` by ETDRK4 (Cox & Matthews), on one intra-op thread."""
    with _one_thread():
        return _etdrk4(v, lin, nonlinear, h, steps)


def _etdrk4(v: Tensor, lin: Tensor, nonlinear: Callable[[Tensor], Tensor], h: float,
            steps: int) -> Tensor:
    e, e2, q, f1, f2, f3 = etdrk4_coefficients(lin, h)
    for _ in range(steps):
        nv = nonlinear(v)
        a = e2 * v + q * nv
        na = nonlinear(a)
        b = e2 * v + q * na
        nb = nonlinear(b)
        c = e2 * a + q * (2 * nb - nv)
        nc = nonlinear(c)
        v = e * v + nv * f1 + 2 * (na + nb) * f2 + nc * f3
    return v


def _burgers_like(u0: Tensor, lin: Tensor, length: float, t_final: float, steps: int) -> Tensor:
    """``u_t + u u_x = L u`` on the periodic ``[0, length)`` from ``u0`` ``(n, size)``."""
    size = u0.shape[-1]
    ik = 1j * 2 * math.pi / length * _wavenumbers(size, 1)[0]
    mask = _dealias(size, 1)

    def nonlinear(vh: Tensor) -> Tensor:  # -(u²/2)_x, dealiased
        u = torch.fft.irfft(vh * mask, n=size, norm="forward")
        return -0.5 * ik * torch.fft.rfft(u * u, norm="forward")

    vh = etdrk4(torch.fft.rfft(u0, norm="forward"), lin, nonlinear, t_final / steps, steps)
    u = torch.fft.irfft(vh, n=size, norm="forward")
    if not torch.isfinite(u).all():
        raise NonFiniteError(f"the solver blew up with {steps} time steps on {size} points; "
                             "use more steps")
    return u


def _finish(a: Tensor, u: Tensor, params: dict, dtype, device) -> OperatorData:
    return OperatorData(a.unsqueeze(1).to(device=device, dtype=dtype),
                        u.unsqueeze(1).to(device=device, dtype=dtype), params)


def burgers(n: int = 100, size: int = 128, viscosity: float = 0.01, t_final: float = 1.0,
            steps: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
            device=None) -> OperatorData:
    """1D viscous Burgers: ``a = u(0)`` (the Gaussian random field of Li et al.'s benchmark,
    :func:`grf` with ``alpha=2, tau=5``), ``u = u(t_final)``, on ``size`` grid points.
    ``steps`` defaults to ``2 * size * t_final`` (the explicit nonlinear part needs a time
    step that shrinks with the grid spacing)."""
    steps = max(1, math.ceil(2 * size * t_final)) if steps is None else steps
    _check(n, size, steps)
    gen = torch.Generator().manual_seed(seed)
    u0 = grf(n, size, 1, gen)
    lin = -viscosity * (2 * math.pi * _wavenumbers(size, 1)[0]) ** 2
    ut = _burgers_like(u0, lin, 1.0, t_final, steps)
    return _finish(u0, ut, dict(pde="burgers", viscosity=viscosity, t_final=t_final),
                   dtype, device)


def kuramoto_sivashinsky(n: int = 100, size: int = 128, length: float = 32 * math.pi,
                         t_final: float = 5.0, steps: int = 50, seed: int = 0,
                         dtype: torch.dtype = torch.float32, device=None) -> OperatorData:
    r"""1D Kuramoto–Sivashinsky on the periodic :math:`[0, \ell)`: ``a = u(0)`` a smooth
    zero-mean random field (modes up to about ``length / 2π · 0.7``, amplitude about 1),
    ``u = u(t_final)``. The linear part :math:`k^2 - k^4` is integrated exactly (ETDRK4)."""
    _check(n, size, steps)
    gen = torch.Generator().manual_seed(seed)
    k = 2 * math.pi / length * _wavenumbers(size, 1)[0]
    j0 = 0.7 * length / (2 * math.pi)  # modes of the unstable band q = 2πj/ℓ < 1
    u0 = grf(n, size, 1, gen, alpha=4.0, tau=2 * math.pi * j0, mean=False)
    u0 = u0 / u0.std(-1, keepdim=True)
    ut = _burgers_like(u0, k**2 - k**4, length, t_final, steps)
    return _finish(u0, ut, dict(pde="kuramoto_sivashinsky", length=length, t_final=t_final),
                   dtype, device)


def darcy(n: int = 100, size: int = 32, low: float = 3.0, high: float = 12.0,
          forcing: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32,
          device=None) -> OperatorData:
    r"""2D Darcy flow :math:`-\nabla\cdot(\kappa\nabla u) = f` on the unit square with
    :math:`u = 0` on the boundary: ``a = κ`` (``high`` where a Gaussian random field with
    covariance :math:`(-\Delta + 9 I)^{-2}` is positive, ``low`` elsewhere), ``u`` its
    solution on the ``size x size`` grid of nodes (boundary included), by the five-point
    scheme with harmonic means of ``κ`` on the cell faces (a sparse direct solve each)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    _check(n, size, 1)
    gen = torch.Generator().manual_seed(seed)
    field = grf(n, size, 2, gen, alpha=2.0, tau=3.0, mean=False)
    kappa = torch.where(field >= 0, high, low).to(torch.float64)
    h = 1.0 / (size - 1)
    m = size - 2
    idx = torch.arange(m * m).reshape(m, m)
    u = torch.zeros(n, size, size, dtype=torch.float64)
    for s in range(n):
        kap = kappa[s]
        rows, cols, vals = [], [], []
        diag = torch.zeros(m, m, dtype=torch.float64)
        inner = kap[1:-1, 1:-1]
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            nb = kap[1 + di:size - 1 + di, 1 + dj:size - 1 + dj]
            face = 2 * inner * nb / (inner + nb) / h**2  # harmonic mean
            diag += face
            ii, jj = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
            ni, nj = ii + di, jj + dj
            ok = (ni >= 0) & (ni < m) & (nj >= 0) & (nj < m)  # boundary neighbours: u = 0
            rows.append(idx[ii[ok], jj[ok]])
            cols.append(idx[ni[ok], nj[ok]])
            vals.append(-face[ok])
        rows.append(idx.reshape(-1))
        cols.append(idx.reshape(-1))
        vals.append(diag.reshape(-1))
        mat = coo_matrix((torch.cat(vals).numpy(), (torch.cat(rows).numpy(),
                                                   torch.cat(cols).numpy())),
                         shape=(m * m, m * m)).tocsr()
        sol = spsolve(mat, forcing * torch.ones(m * m, dtype=torch.float64).numpy())
        u[s, 1:-1, 1:-1] = torch.from_numpy(sol).reshape(m, m)
    return _finish(kappa, u, dict(pde="darcy", low=low, high=high, forcing=forcing),
                   dtype, device)


def advection_diffusion_reaction(
    n: int = 100,
    size: int = 32,
    variant: str = "train",
    velocity: tuple[float, float] = (1.0, 0.5),
    speed_range: tuple[float, float] = (0.5, 1.5),
    diffusion: float = 0.005,
    reaction: float = 1.0,
    source: float = 2.0,
    t_final: float = 0.3,
    steps: int = 30,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> OperatorData:
    r"""2D advection–diffusion–reaction
    :math:`u_t + c\cdot\nabla u = D\Delta u + \rho u(1-u) + s(x)` on the periodic unit square.

    Inputs ``a`` ``(N, 4, size, size)``: the initial state :math:`u(0)` (a random field in
    ``[0, 1]``) and the coefficient fields :math:`c_1, c_2, s` as constant / spatial channels,
    so that an operator sees which dynamics it is asked about; ``u = u(t_final)``
    ``(N, 1, size, size)``. Each sample's velocity is ``velocity`` times a speed drawn
    uniformly from ``speed_range``.

    ``variant``: ``"train"`` (no source), ``"reversed"`` (velocity :math:`-c`: out of
    distribution) or ``"source"`` (a Gaussian source of height ``source`` at ``(0.5, 0.5)``:
    out of distribution)."""
    _check(n, size, steps)
    if variant not in ADR_VARIANTS:
        raise InvalidArgumentError(f"variant must be one of {ADR_VARIANTS}, got {variant!r}")
    gen = torch.Generator().manual_seed(seed)
    g = grf(n, size, 2, gen, alpha=2.5, tau=4.0, mean=False)
    u0 = torch.sigmoid(2.0 * g / g.std((-2, -1), keepdim=True))
    lo, hi = speed_range
    speed = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    if variant == "reversed":
        speed = -speed
    c = speed[:, None] * torch.tensor(velocity, dtype=torch.float64)  # (n, 2)
    k1, k2 = (2 * math.pi * k for k in _wavenumbers(size, 2))
    lin = (-1j * (c[:, 0, None, None] * k1 + c[:, 1, None, None] * k2)
           - diffusion * (k1**2 + k2**2) + reaction)
    x = torch.arange(size, dtype=torch.float64) / size
    xx, yy = torch.meshgrid(x, x, indexing="ij")
    s = torch.zeros(size, size, dtype=torch.float64)
    if variant == "source":
        s = source * torch.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / (2 * 0.08**2))
    sh = torch.fft.rfft2(s, norm="forward")
    mask = _dealias(size, 2)

    def nonlinear(vh: Tensor) -> Tensor:  # -ρ u² + s, dealiased
        v = torch.fft.irfft2(vh * mask, s=(size, size), norm="forward")
        return torch.fft.rfft2(-reaction * v * v, norm="forward") + sh

    vh = etdrk4(torch.fft.rfft2(u0, norm="forward"), lin, nonlinear, t_final / steps, steps)
    ut = torch.fft.irfft2(vh, s=(size, size), norm="forward")
    fields = c[:, :, None, None].expand(n, 2, size, size)
    a = torch.cat([u0.unsqueeze(1), fields, s.expand(n, 1, size, size)], 1)
    params = dict(pde="advection_diffusion_reaction", variant=variant, velocity=velocity,
                  speed_range=speed_range, diffusion=diffusion, reaction=reaction,
                  t_final=t_final)
    return OperatorData(a.to(device=device, dtype=dtype),
                        ut.unsqueeze(1).to(device=device, dtype=dtype), params)


def heat(n: int = 100, size: int = 64, variant: str = "train", diffusivity: float = 5e-4,
         t_final: float = 1.0, modes: tuple[int, int] = (1, 8), shift: tuple[int, int] = (10, 24),
         source: float = 1.0, seed: int = 0, out_size: int | None = None,
         dtype: torch.dtype = torch.float32, device=None) -> OperatorData:
    r"""1D heat equation with a source, :math:`u_t = \nu u_{xx} + s(x)`, periodic
    :math:`[0,1)`, solved exactly per Fourier mode: with :math:`\lambda_k = \nu (2\pi k)^2`,

    .. math:: \hat u_k(T) = e^{-\lambda_k T}\hat u_k(0)
              + \tfrac{1 - e^{-\lambda_k T}}{\lambda_k}\hat s_k \quad(\hat s_0 T \text{ at } k=0).

    Inputs ``a`` ``(N, 2, size)``: :math:`u(0)` and :math:`s`; ``u = u(T)`` ``(N, 1, size)``.
    :math:`u(0)` has independent Gaussian Fourier coefficients of variance :math:`1/k` on the
    wavenumbers ``modes`` (``"train"``, ``"source"``) or ``shift`` (``"frequency"``: higher
    frequencies than in training), normalised to unit variance per point. The source is zero
    except in ``"source"``: a random smooth field (wavenumbers 1-4) of standard deviation
    ``source``. ``out_size``: the targets on a grid of that many points (the same functions:
    the exact solution is a trigonometric polynomial), e.g. to test super-resolution."""
    _check(n, size, 1)
    if out_size is not None:
        _check(n, out_size, 1)
    if variant not in HEAT_VARIANTS:
        raise InvalidArgumentError(f"variant must be one of {HEAT_VARIANTS}, got {variant!r}")
    gen = torch.Generator().manual_seed(seed)

    def field(band: tuple[int, int]) -> Tensor:
        k = torch.arange(size // 2 + 1, dtype=torch.float64)
        sd = ((k >= band[0]) & (k <= band[1])) / k.clamp_min(1).sqrt()
        shape = (n, k.numel())
        xi = torch.complex(torch.randn(shape, generator=gen, dtype=torch.float64),
                           torch.randn(shape, generator=gen, dtype=torch.float64))
        f = torch.fft.irfft(sd * xi, n=size, norm="forward")
        return f / f.std(-1, keepdim=True)

    u0 = field(shift if variant == "frequency" else modes)
    s = source * field((1, 4)) if variant == "source" else torch.zeros_like(u0)
    lam = diffusivity * (2 * math.pi * _wavenumbers(size, 1)[0]) ** 2
    decay = torch.exp(-lam * t_final)
    gain = torch.where(lam > 0, (1 - decay) / lam.clamp_min(1e-300), torch.full_like(lam, t_final))
    uh = decay * torch.fft.rfft(u0, norm="forward") + gain * torch.fft.rfft(s, norm="forward")
    if out_size is not None and out_size != size:  # zero-pad / crop the spectrum
        m = min(out_size // 2 + 1, uh.shape[-1])
        uh = torch.nn.functional.pad(uh[..., :m], (0, out_size // 2 + 1 - m))
    ut = torch.fft.irfft(uh, n=out_size or size, norm="forward")
    a = torch.stack([u0, s], 1)
    params = dict(pde="heat", variant=variant, diffusivity=diffusivity, t_final=t_final)
    return OperatorData(a.to(device=device, dtype=dtype),
                        ut.unsqueeze(1).to(device=device, dtype=dtype), params)


__all__ = [
    "OperatorData",
    "heat",
    "HEAT_VARIANTS",
    "burgers",
    "kuramoto_sivashinsky",
    "darcy",
    "advection_diffusion_reaction",
    "grf",
    "etdrk4",
    "etdrk4_coefficients",
    "ADR_VARIANTS",
]
