r"""The NTK of a network from per-layer factors, without the ``N x P`` Jacobian.

For an ``nn.Linear`` layer :math:`z = W a + b` applied once to each sample's feature vector,
the Jacobian rows of output :math:`c` are :math:`J_W(x) = g_c(x)\,a(x)^\top` and
:math:`J_b(x) = g_c(x)`, with :math:`g_c = \partial f_c/\partial z` and :math:`a` the layer's
input. With the prior variance :math:`v_j` of input column :math:`j` of :math:`W` (constant
along its rows, as for every prior granularity of :func:`~bayescurv.bo.ntk.prior_groups`) and
:math:`u_o` of bias entry :math:`o`,

.. math::
    J_W(x)\,V\,J_W(x')^\top = \big(g_c(x)\cdot g_{c'}(x')\big)\,
    \big(a(x)^\top \mathrm{diag}(v)\,a(x')\big),\qquad
    J_b(x)\,U\,J_b(x')^\top = g_c(x)^\top\mathrm{diag}(u)\,g_{c'}(x'),

so a kernel block between ``N`` and ``N'`` targets costs :math:`O(N N'(d_{in} + d_{out}))` per
layer instead of :math:`O(N N' d_{in} d_{out})`, and the factors take :math:`O(N(d_{in} +
d_{out}))` memory instead of the Jacobian's :math:`O(N P)`. Products with the Jacobian are as
cheap: :math:`J_W(x)\,\mathrm{vec}(\Delta W) = g_c^\top \Delta W a` and
:math:`J_W^\top u = \sum_{i,c} u_{ic}\, g_{ic} a_i^\top`.

The factors come from one vmapped reverse pass per sample with respect to a zero perturbation
added to every factored layer's output (the :math:`g`), while forward hooks record the layer
inputs (the :math:`a`); both are differentiable in the inputs. Parameters of every other module
(LayerNorm, convolutions, a ``Linear`` applied to a sequence or called twice, a weight tied
between modules) keep explicit Jacobian columns (``rest``), so any network is handled exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayescurv.params import ParamSet, select_output

#: points per vmapped reverse pass
CHUNK = 512


@dataclass
class Factors:
    """The network at ``n`` inputs with ``m`` outputs, factored: outputs ``f`` (``(..., n m)``,
    input-major), per factored layer its inputs ``acts`` (``(..., n, d_in)``) and output
    gradients ``grads`` (``(..., n m, d_out)``), and the Jacobian of the other parameters
    ``rest`` (``(..., n m, P_rest)``). Leading dimensions are t-batches (:meth:`batched`)."""

    f: Tensor
    acts: list[Tensor]
    grads: list[Tensor]
    rest: Tensor
    num_outputs: int

    def batched(self, t: int) -> Factors:
        """The same factors as ``t`` independent batches of ``n / t`` inputs each."""
        def split(x: Tensor) -> Tensor:
            return x.reshape(t, x.shape[0] // t, *x.shape[1:])

        return Factors(split(self.f), [split(a) for a in self.acts],
                       [split(g) for g in self.grads], split(self.rest), self.num_outputs)


@dataclass
class _Layer:
    module: nn.Linear
    weight: slice | None  # flat slice of the weight, if it is in the set
    bias: slice | None
    weight_groups: Tensor | None  # (d_in,) prior group of each input column
    bias_groups: Tensor | None  # (d_out,)


class FactoredJacobian:
    r"""Kernels :math:`J(X_1)\,\mathrm{diag}(1/\delta_{g(p)})\,J(X_2)^\top`, group Gram
    matrices and Jacobian products of the parameters ``params`` from per-layer factors
    (module docstring).

    Args:
        params: the parameters (at their current values, :math:`\theta^*`).
        groups: prior group of every flat parameter (``(P,)``,
            :func:`~bayescurv.bo.ntk.prior_groups`).
        example: one or more inputs (``(n, d)``) for the probe forward pass that finds the
            ``nn.Linear`` layers applied once to a per-sample vector (any input type the
            network takes per sample: vectors, images, token ids).
    """

    def __init__(self, params: ParamSet, groups: Tensor, example: Tensor) -> None:
        self.params = params
        self.groups = groups
        calls: dict[nn.Module, list[tuple[int, ...]]] = {}

        def probe(mod: nn.Module, inp: tuple, out: Tensor) -> None:
            calls.setdefault(mod, []).append(tuple(inp[0].shape[:-1]))

        linears = [m for _, m, _ in params.modules() if isinstance(m, nn.Linear)]
        handles = [m.register_forward_hook(probe) for m in linears]
        try:
            with torch.no_grad():
                params.forward(example[:1])
        finally:
            for h in handles:
                h.remove()
        owners: dict[int, int] = {}
        for _, _, owned in params.modules():
            for _, i in owned:
                owners[i] = owners.get(i, 0) + 1
        self.layers: list[_Layer] = []
        factored: set[int] = set()
        for m in linears:
            # one call on one row for the one sample: unused, reused, or applied to a sequence
            # (also one folded into the batch dimension, (T, d) for the sample) is explicit
            if calls.get(m) != [(1,)]:
                continue
            iw, ib = params.index_of(m.weight), (
                params.index_of(m.bias) if m.bias is not None else -1)
            own = [i for i in (iw, ib) if i >= 0]
            if any(owners[i] > 1 for i in own):  # tied to another module
                continue
            wg = bg = None
            if iw >= 0:
                g = groups[params.slice_of(iw)].reshape(m.out_features, m.in_features)
                if not bool((g == g[:1]).all()):  # groups vary along the rows
                    continue
                wg = g[0]
            if ib >= 0:
                bg = groups[params.slice_of(ib)]
            self.layers.append(_Layer(m, params.slice_of(iw) if iw >= 0 else None,
                                      params.slice_of(ib) if ib >= 0 else None, wg, bg))
            factored.update(own)
        self.rest_params = [i for i in range(len(params.params)) if i not in factored]
        idx = [torch.arange(params.slice_of(i).start, params.slice_of(i).stop)
               for i in self.rest_params]
        self.rest_index = (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)).to(
            groups.device)

    # factors ------------------------------------------------------------------------------
    def factors(self, x: Tensor) -> Factors:
        """The factors at inputs ``x`` (``(n, d)``) at the current parameters; differentiable
        in ``x``."""
        ps = self.params
        mods = [layer.module for layer in self.layers]
        names = [ps.names[i] for i in self.rest_params]
        rest0 = tuple(ps.params[i].detach() for i in self.rest_params)
        eps0 = tuple(torch.zeros(m.out_features, dtype=ps.dtype, device=ps.device)
                     for m in mods)

        def single(eps: tuple[Tensor, ...], rest: tuple[Tensor, ...], xi: Tensor):
            acts: dict[int, Tensor] = {}

            def hook(k: int):
                def add(mod: nn.Module, inp: tuple, out: Tensor) -> Tensor:
                    acts[k] = inp[0].reshape(-1)
                    return out + eps[k]
                return add

            handles = [m.register_forward_hook(hook(k)) for k, m in enumerate(mods)]
            try:
                out = torch.func.functional_call(ps.model, dict(zip(names, rest)),
                                                 (xi.unsqueeze(0),))
            finally:
                for h in handles:
                    h.remove()
            out = select_output(out, ps.output_key, xi.unsqueeze(0)).reshape(-1)
            return out, (out, [acts[k] for k in range(len(mods))])

        jac = torch.func.vmap(torch.func.jacrev(single, argnums=(0, 1), has_aux=True),
                              in_dims=(None, None, 0))
        fs: list[Tensor] = []
        acts: list[list[Tensor]] = [[] for _ in mods]
        grads: list[list[Tensor]] = [[] for _ in mods]
        rests: list[Tensor] = []
        m = 1
        for chunk in x.split(CHUNK):
            (j_eps, j_rest), (f, a) = jac(eps0, rest0, chunk)
            m = f.shape[1]
            k = f.shape[0] * m
            fs.append(f.reshape(-1))
            for layer_acts, layer_grads, ak, gk in zip(acts, grads, a, j_eps):
                layer_acts.append(ak)
                layer_grads.append(gk.reshape(k, -1))
            rests.append(torch.cat([j.reshape(k, -1) for j in j_rest], -1) if j_rest
                         else f.new_zeros(k, 0))
        return Factors(torch.cat(fs), [torch.cat(a) for a in acts],
                       [torch.cat(g) for g in grads], torch.cat(rests), m)

    # kernels ------------------------------------------------------------------------------
    def kernel(self, f1: Factors, f2: Factors, precision: Tensor) -> Tensor:
        r""":math:`J(X_1)\,D^{-1} J(X_2)^\top` (``(..., n_1 m, n_2 m)``) with
        :math:`D = \mathrm{diag}(\delta_{g(p)})`, ``precision`` the :math:`\delta_g`."""
        var = 1 / precision
        k = (f1.rest * var[self.groups[self.rest_index]]) @ f2.rest.transpose(-1, -2)
        for i, layer in enumerate(self.layers):
            g1, g2 = f1.grads[i], f2.grads[i]
            if layer.weight_groups is not None:
                aa = (f1.acts[i] * var[layer.weight_groups]) @ f2.acts[i].transpose(-1, -2)
                k = k + (g1 @ g2.transpose(-1, -2)) * self._expand(aa, f1.num_outputs)
            if layer.bias_groups is not None:
                k = k + (g1 * var[layer.bias_groups]) @ g2.transpose(-1, -2)
        return k

    def grams(self, f: Factors, num_groups: int) -> Tensor:
        r""":math:`J_g(X) J_g(X)^\top` of every prior group (``(G, N, N)``)."""
        n = f.f.shape[-1]
        out = f.f.new_zeros(num_groups, n, n)
        rest_groups = self.groups[self.rest_index]
        for g in rest_groups.unique().tolist():
            j = f.rest[:, rest_groups == g]
            out[g] += j @ j.T
        for i, layer in enumerate(self.layers):
            g1 = f.grads[i]
            if layer.weight_groups is not None:
                gg = g1 @ g1.T
                for g in layer.weight_groups.unique().tolist():
                    a = f.acts[i][:, layer.weight_groups == g]
                    out[g] += gg * self._expand(a @ a.T, f.num_outputs)
            if layer.bias_groups is not None:
                for g in layer.bias_groups.unique().tolist():
                    b = g1[:, layer.bias_groups == g]
                    out[g] += b @ b.T
        return out

    # Jacobian products --------------------------------------------------------------------
    def jvp(self, f: Factors, v: Tensor) -> Tensor:
        """:math:`J(X) v` (``(n m,)``) for a flat parameter vector ``v`` (``(P,)``)."""
        out = f.rest @ v[self.rest_index]
        m = f.num_outputs
        for i, layer in enumerate(self.layers):
            g = f.grads[i]
            if layer.weight is not None:
                w = v[layer.weight].reshape(layer.module.out_features, -1)
                za = (f.acts[i] @ w.T).repeat_interleave(m, dim=-2)
                out = out + (g * za).sum(-1)
            if layer.bias is not None:
                out = out + g @ v[layer.bias]
        return out

    def vjp(self, f: Factors, u: Tensor) -> Tensor:
        r""":math:`J(X)^\top u` (``(P,)``) for ``u`` of shape ``(n m,)``."""
        out = u.new_zeros(self.params.numel)
        out[self.rest_index] = f.rest.T @ u
        m = f.num_outputs
        for i, layer in enumerate(self.layers):
            gu = f.grads[i] * u.unsqueeze(-1)  # (n m, d_out)
            if layer.weight is not None:
                out[layer.weight] = (gu.T @ f.acts[i].repeat_interleave(m, dim=0)).reshape(-1)
            if layer.bias is not None:
                out[layer.bias] = gu.sum(0)
        return out

    @staticmethod
    def _expand(aa: Tensor, m: int) -> Tensor:
        """``(..., n1, n2)`` per input pair to ``(..., n1 m, n2 m)`` per target pair."""
        if m == 1:
            return aa
        return aa.repeat_interleave(m, dim=-2).repeat_interleave(m, dim=-1)
