r"""Accumulators: from the per-batch module records of :mod:`.engine` to a curvature matrix
in one structure. Each has ``update(records)`` (called once per batch) and
``tensors()`` (the running sums, all-reduced across ranks before ``finalize``).

All sums are over data points and loss-square-root columns:
:math:`\sum_{b,k} v_{bk} v_{bk}^\top` with :math:`v_{bk} = J_b^\top s_{bk}`.

Precision: the running sums live in :func:`~bayescurv.linalg.internal_dtype` of the model
(float64 for float32/bf16/fp16 models) and each batch's factors are cast up *before* their
products are formed, so the sums, the Kronecker factors and every decomposition built from
them carry float64 rounding; only the per-datum quantities themselves (activations,
backpropagated vectors) carry the model's. The returned operators are in that dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.curvature import layers
from bayescurv.curvature.engine import HookCapture
from bayescurv.curvature.records import ModuleRecord
from bayescurv.errors import UnsupportedLayerError
from bayescurv.linalg import (
    BlockDiagonal,
    Dense,
    Diagonal,
    KroneckerBatch,
    KroneckerEigen,
    PSDOperator,
    internal_dtype,
    product_dtype,
    robust_eigh,
)
from bayescurv.params import ParamSet

LOOSE_DENSE_MAX = 2048
"""Largest number of entries of a module's non-Kronecker parameters (norm affine
parameters, loose parameters such as class tokens, position codes, layer-scale gammas, bias
tables) that K-FAC / EKFAC give an exact dense block; above it they get their exact
diagonal (a ViT-S/16's ``pos_embed`` has 75,648 entries: a dense block would take 46 GB)."""

GRAM_ROWS = 4096
"""Rows of a factor converted to the state's dtype at once by the Gram accumulation."""


def _per_sample(rec: ModuleRecord, dtype: torch.dtype | None) -> dict[int, Tensor]:
    """``rec.per_sample()``; with ``dtype``, linear-like layers form the products
    ``Σ_t g aᵀ`` from factors cast to ``dtype`` first (no rounding of the products in a
    lower precision), other layers are cast afterwards."""
    if dtype is None:
        return rec.per_sample()
    if rec.route != "linear" or not rec.called:
        return {i: t.to(dtype) for i, t in rec.per_sample().items()}
    v = rec.linear_view()
    ps = layers.linear_per_sample(layers.LinearView(v.a.to(dtype), v.g.to(dtype)))
    w, b = layers.split_per_sample(rec.module, ps, rec.with_bias)
    out = {rec.owned["weight"]: w}
    if b is not None:
        out[rec.owned["bias"]] = b
    return out


def per_sample_matrix(records: list[ModuleRecord], params: ParamSet,
                      dtype: torch.dtype | None = None) -> Tensor:
    """Per-sample gradients of all parameters of the set, ``(K * B, P)`` in flat order;
    contributions of tied parameters (one parameter, several modules) are summed. In
    ``dtype`` when given (formed from factors cast up first), else the model's."""
    parts: dict[int, Tensor] = {}
    for rec in records:
        for i, t in _per_sample(rec, dtype).items():
            parts[i] = parts[i] + t if i in parts else t
    k, b = next(iter(parts.values())).shape[:2]
    cols = []
    for i, p in enumerate(params.params):
        cols.append(parts[i] if i in parts else torch.zeros(k, b, p.numel(), dtype=dtype or
                                                               p.dtype, device=p.device))
    return torch.cat(cols, -1).reshape(k * b, -1)


class FullAccumulator:
    """Dense ``P x P`` GGN: :math:`\\sum V^\\top V` with ``V`` the per-sample gradients."""

    def __init__(self, capture: HookCapture) -> None:
        self.params = capture.params
        n = self.params.numel
        self.dtype = internal_dtype(self.params.dtype)
        self.matrix = torch.zeros(n, n, dtype=self.dtype, device=self.params.device)

    def update(self, records: list[ModuleRecord], first: bool = True) -> None:
        v = per_sample_matrix(records, self.params, self.dtype)
        self.matrix.addmm_(v.T, v)

    def tensors(self) -> list[Tensor]:
        return [self.matrix]

    def finalize(self) -> PSDOperator:
        return Dense(0.5 * (self.matrix + self.matrix.T))


class DiagAccumulator:
    """Exact GGN diagonal, per layer from the backpropagated vectors and the layer inputs
    (:func:`layers.linear_diag`); per-sample gradients only of a single module where the
    layer shares weights, is generic, or holds a tied parameter."""

    def __init__(self, capture: HookCapture) -> None:
        self.params = capture.params
        self.tied = capture.tied
        self.dtype = internal_dtype(self.params.dtype)
        self.diag = torch.zeros(self.params.numel, dtype=self.dtype, device=self.params.device)

    def update(self, records: list[ModuleRecord], first: bool = True) -> None:
        tied_parts: dict[int, Tensor] = {}
        for rec in records:
            if not rec.called:
                continue
            if rec.route == "linear" and not (set(rec.owned.values()) & self.tied):
                self._update_linear(rec)
                continue
            for i, t in _per_sample(rec, self.dtype).items():
                if i in self.tied:
                    tied_parts[i] = tied_parts[i] + t if i in tied_parts else t
                else:
                    self._add(i, t.square().sum((0, 1)))
        for i, t in tied_parts.items():
            self._add(i, t.square().sum((0, 1)))

    def _update_linear(self, rec: ModuleRecord) -> None:
        if rec.output_hessian is not None:  # the output layer: Σ_k g² = diag(H_b), closed form
            lik, f = rec.output_hessian
            a = rec.linear_inputs(augment=False)[:, 0, :].to(self.dtype)
            self._add_rank_one(rec, lik.hessian_diagonal(f).to(self.dtype), a)
            return
        a = rec.linear_inputs(augment=False, keep=True)  # (B, T, I); grouped (G, B, T, I)
        g = rec.linear_grads()  # (K, B, T, O); grouped (G, K, B, T, O)
        if a.shape[-2] == 1:  # no sharing: Σ_b (Σ_k g²)ᵀ a², written in place
            self._add_rank_one(rec, g[..., 0, :].to(self.dtype).square().sum(-3),
                               a[..., 0, :].to(self.dtype))
            return
        if rec.with_bias:  # the column of ones of the bias
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
        work = product_dtype(self.params.dtype)
        d = layers.linear_diag(layers.LinearView(a.to(work), g.to(work)),
                               out_dtype=self.dtype)  # (O, I), per-input Jacobians squared
        if rec.with_bias:
            self._add(rec.owned["bias"], d[:, -1])
            d = d[:, :-1]
        self._add(rec.owned["weight"], d.T if layers.linear_layout(rec.module).transposed
                  else d)

    def _add_rank_one(self, rec: ModuleRecord, g2: Tensor, a: Tensor) -> None:
        """``diag += Σ_b g2_b ⊗ a_b²`` in place (``g2`` ``(B, O)``, ``a`` ``(B, I)``; grouped
        ``(G, B, O_g)``, ``(G, B, I)``: one batched product, rows ``j O_g + o``)."""
        w = self.diag[self.params.slice_of(rec.owned["weight"])]
        if g2.dim() == 3:
            w.view(g2.shape[0], g2.shape[2], -1).baddbmm_(g2.mT, a.square())
        elif layers.linear_layout(rec.module).transposed:  # weight stored (I, O)
            w.view(-1, g2.shape[1]).addmm_(a.square().T, g2)
        else:
            w.view(g2.shape[1], -1).addmm_(g2.T, a.square())
        if rec.with_bias:
            self._add(rec.owned["bias"], g2.sum(-2))

    def _add(self, index: int, values: Tensor) -> None:
        self.diag[self.params.slice_of(index)] += values.reshape(-1)

    def tensors(self) -> list[Tensor]:
        return [self.diag]

    def finalize(self) -> PSDOperator:
        return Diagonal(self.diag)


def kron_index(params: ParamSet, rec: ModuleRecord) -> Tensor:
    """Flat positions of the row-major entries of ``W̃ = [W | b]`` (shape ``(O, I)``; a
    grouped convolution's rows ``j O_g + o`` are its ``C_out`` channels, so the groups'
    blocks follow one another; a transposed weight ``(I, O)`` is read column-wise)."""
    w = params.params[rec.owned["weight"]]
    lay = layers.linear_layout(rec.module)
    sw = params.slice_of(rec.owned["weight"])
    idx = torch.arange(sw.start, sw.stop, device=w.device)
    idx = idx.reshape(lay.inp, lay.out).T if lay.transposed else idx.reshape(lay.out, -1)
    if rec.with_bias:
        sb = params.slice_of(rec.owned["bias"])
        idx = torch.cat([idx, torch.arange(sb.start, sb.stop, device=w.device)[:, None]], 1)
    return idx.reshape(-1)


def live_positions(g: Tensor) -> Tensor | None:
    """Which weight-sharing positions reach the network output: ``(B, T)``, ``False`` where
    the output gradients ``g`` (``(K, B, T, O)``, grouped ``(G, K, B, T, O)``) vanish for
    every column — padding tokens behind an attention mask, positions after the one a
    causal LM is read at. ``None`` without sharing (``T = 1``: a datum is never dropped).
    K-FAC leaves these positions out of the input factor and its count, so that padding a
    batch does not change the curvature (the exact GGN gets nothing from them anyway); the
    mask weights the rows instead of selecting them (no host synchronisation)."""
    if g.shape[-2] == 1:
        return None
    dims = [0, -1] if g.dim() == 4 else [0, 1, -1]
    live = g.ne(0).any(dim=dims[-1])
    for d in sorted(dims[:-1], reverse=True):
        live = live.any(dim=d)
    return live


def _live_so_far(rec: ModuleRecord, g: Tensor, call: int = 0) -> Tensor | None:
    """:func:`live_positions` of the batch over its chunks of loss columns so far (a
    position is live when any column reaches it; the factors that use the mask are formed at
    the batch's last chunk, when every column has been seen)."""
    live = live_positions(g)
    if live is None or rec.chunk[1] == 1:
        return live
    key = ("live", call)
    if rec.chunk[0] > 0:
        live = live | rec.cache[key]
    rec.cache[key] = live
    return live


class KFACAccumulator:
    r"""K-FAC, flavours ``expand`` and ``reduce`` (Eschenhagen et al., 2023), for linear-like
    layers with ``T`` weight-sharing positions:

    - expand: :math:`A = \frac{1}{NT}\sum_{n,t} a_{nt} a_{nt}^\top`,
      :math:`G = \sum_{k,n,t} g_{knt} g_{knt}^\top`;
    - reduce: :math:`A = \frac{1}{N}\sum_n \bar a_n \bar a_n^\top` with
      :math:`\bar a_n = \frac1T\sum_t a_{nt}`, :math:`G = \sum_{k,n} (\sum_t g_{knt})(\cdot)^\top`;

    where positions that do not reach the output (:func:`live_positions`: padding) are left
    out of ``A``, its count ``NT`` and the mean :math:`\bar a_n`;

    and the block is :math:`G \otimes A` on row-major ``vec(W̃)``. Both are exact for one
    data point without sharing. A grouped convolution gets one pair per group, summed as
    batched ``(G, I, I)`` / ``(G, O_g, O_g)`` Grams, and the block
    :math:`\mathrm{blockdiag}_j (G_j \otimes A_j)` (:class:`~bayescurv.linalg.KroneckerBatch`).
    Embeddings use expand with the diagonal ``A`` of row counts;
    other layers (norm affine parameters, opted-in generic modules) get an exact dense block.
    """

    def __init__(self, capture: HookCapture, flavour: str = "expand") -> None:
        if capture.tied:
            raise UnsupportedLayerError(
                f"parameters {capture.tied_names()} are tied (shared by several modules); "
                "K-FAC has no Kronecker block for them. Use structure='diag' or 'full'"
            )
        self.params = capture.params
        self.dtype = internal_dtype(self.params.dtype)
        self.flavour = flavour
        # running sums, allocated up front from the module shapes so that every rank holds
        # the same tensors for the all-reduce, whichever modules its data reached
        self.state = {rec.name: self._zeros(rec) for rec in capture.records}

    def _zeros(self, rec: ModuleRecord) -> dict[str, Tensor]:
        def z(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=self.dtype, device=self.params.device)

        if rec.route == "linear":
            lay = layers.linear_layout(rec.module)
            o, i = lay.out_per_group, lay.inp
            lead = (lay.groups,) if lay.groups > 1 else ()
            st = {"A": z(*lead, i, i), "G": z(*lead, o, o), "count": z()}
            if rec.with_bias:
                st["a_sum"] = z(*lead, i)
            return st
        if rec.route == "embedding":
            return {"A": z(rec.module.num_embeddings), "G": z(*[rec.module.embedding_dim] * 2),
                    "count": z()}
        p = sum(self.params.params[i].numel() for i in rec.owned.values())
        if p > LOOSE_DENSE_MAX:
            return {"diag": z(p), "count": z()}
        return {"block": z(p, p), "count": z()}

    def called(self, rec: ModuleRecord) -> bool:
        """Whether the module saw any data (otherwise its block is zero)."""
        return bool(self.state[rec.name]["count"] > 0)

    def _acc(self, rec: ModuleRecord, key: str, value: Tensor | float) -> None:
        self.state[rec.name][key].add_(value)

    def _acc_gram(self, rec: ModuleRecord, key: str, x: Tensor,
                  work: torch.dtype | None = None) -> None:
        """``state[key] += xᵀ x`` in place (``x``: ``(rows, d)``), over chunks of
        :data:`GRAM_ROWS` rows. By default in the state's dtype: products of float32 numbers
        are exact in float64, so the Gram of a float32 model's factors is summed without
        rounding (a float32 sum loses the small eigenvalues of an ill-conditioned factor:
        measured on the float32 sine regression of ``tests/test_float32.py``); rows are
        converted chunk by chunk, so no float64 copy of the whole factor is made. With
        ``work`` (:func:`~bayescurv.linalg.product_dtype`, for weight-sharing layers) each
        chunk's Gram is formed in ``work`` and only the chunk sums are added in the state's
        dtype — the policy of the per-input products of the diagonal and EKFAC (a chunk holds
        a few data points' positions; half the time of a float64 product, no conversion)."""
        acc = self.state[rec.name][key]
        dt = acc.dtype if work is None else work
        grouped = x.dim() == 3  # (G, rows, d): one batched product per chunk
        for s in range(0, x.shape[-2], GRAM_ROWS):
            xs = (x[:, s:s + GRAM_ROWS] if grouped else x[s:s + GRAM_ROWS]).to(dt)
            if dt == acc.dtype:
                acc.baddbmm_(xs.mT, xs) if grouped else acc.addmm_(xs.T, xs)
            else:
                acc.add_((xs.mT @ xs).to(acc.dtype))

    def _work(self, x: Tensor) -> torch.dtype | None:
        """Dtype of the Gram chunks of a factor ``x`` (``(..., B, T, d)``):
        :func:`~bayescurv.linalg.product_dtype` with weight sharing (``T > 1``), the state's
        dtype (``None``) without."""
        return product_dtype(self.params.dtype) if x.shape[-2] > 1 else None

    def update(self, records: list[ModuleRecord], first: bool = True) -> None:
        for rec in records:
            if not rec.called:
                continue
            if rec.route == "linear":
                closed = rec.output_hessian is not None  # the output layer (T = 1)
                reduce = self.flavour == "reduce" and not closed
                live = None if closed else _live_so_far(rec, rec.linear_grads())
                if rec.last:  # the batch's last chunk of loss columns: the inputs' factor
                    a = rec.linear_inputs(augment=False)  # unfolded once per batch
                    if live is not None:  # positions the output does not see: weight 0
                        live = live.to(a.dtype)[..., None]  # (B, T, 1)
                    if reduce:
                        a = (a.mean(-2, keepdim=True) if live is None else
                             (a * live).sum(-2, keepdim=True) / live.sum(-2, keepdim=True)
                             .clamp_min(1))
                        live = None
                    elif live is not None:
                        a = a * live
                    a2 = a.reshape(*a.shape[:-3], -1, a.shape[-1])  # grouped: (G, B T, I)
                    self._acc_gram(rec, "A", a2, self._work(a))
                    if rec.with_bias:  # the bias column of ones: Σ a and the count
                        self._acc(rec, "a_sum", a2.sum(-2, dtype=self.dtype))
                    self._acc(rec, "count", a2.shape[-2] if live is None else live.sum())
                if closed:  # Σ_k g gᵀ summed over the batch is Σ_b H_b: O(B C²), no roots
                    lik, f = rec.output_hessian
                    self._acc(rec, "G", lik.hessian_sum(f).to(self.dtype))
                else:
                    g = rec.linear_grads()
                    if reduce:
                        g = g.sum(-2, keepdim=True)
                    self._acc_gram(rec, "G", g.reshape(*g.shape[:-4], -1, g.shape[-1]),
                                   self._work(g))
            elif rec.route == "embedding":
                for j, (x, g) in enumerate(zip(rec.inputs, rec.grads)):
                    live = _live_so_far(rec, g.reshape(*g.shape[:2], -1, g.shape[-1]), j)
                    if rec.last:
                        self._acc(rec, "A", layers.embedding_counts(
                            rec.module, x, None if live is None else live.to(self.dtype)))
                        self._acc(rec, "count", x.numel() if live is None else live.sum())
                    self._acc_gram(rec, "G", g.reshape(-1, g.shape[-1]).to(self.dtype))
            else:
                ps = _per_sample(rec, self.dtype)
                v = torch.cat([ps[i] for i in sorted(ps)], -1)
                if "diag" in self.state[rec.name]:
                    self._acc(rec, "diag", v.square().sum((0, 1)))
                else:
                    self._acc_gram(rec, "block", v.reshape(-1, v.shape[-1]))
                if first:
                    self._acc(rec, "count", v.shape[1])

    def tensors(self) -> list[Tensor]:
        return [t for st in self.state.values() for _, t in sorted(st.items())]

    def factors(self, rec: ModuleRecord) -> tuple[Tensor, Tensor]:
        """The two Kronecker factors of a record, in the order of the flat layout. An
        embedding's first factor is diagonal and returned as its diagonal ``(V,)`` (kept
        diagonal by :class:`~bayescurv.linalg.KroneckerEigen`: no ``V x V`` matrix)."""
        st = self.state[rec.name]
        count = st["count"].clamp_min(1)
        if rec.route == "linear":  # grouped: (G, O_g, O_g), (G, I, I)
            a = st["A"]
            if rec.with_bias:  # augmented input [a, 1]: [[Σ a aᵀ, Σ a], [Σ aᵀ, count]]
                s = st["a_sum"][..., :, None]
                n = st["count"].expand(*s.shape[:-2], 1, 1)
                a = torch.cat([torch.cat([a, s], -1), torch.cat([s.mT, n], -1)], -2)
            return st["G"], a / count
        return st["A"] / count, st["G"]  # embedding: (V, D) row-major -> diag(A) ⊗ G

    def index(self, rec: ModuleRecord) -> Tensor:
        if rec.route == "linear":
            return kron_index(self.params, rec)
        return torch.cat([torch.arange(self.params.slice_of(i).start,
                                       self.params.slice_of(i).stop,
                                       device=self.params.device)
                          for i in sorted(rec.owned.values())])

    def finalize_blocks(self, records: list[ModuleRecord]) -> BlockDiagonal:
        blocks, indices = [], []
        for rec in records:
            if not self.called(rec):  # never called in the forward pass: no curvature
                idx = self.index(rec)
                blocks.append(Diagonal(torch.zeros(idx.numel(), dtype=self.dtype,
                                                   device=self.params.device)))
                indices.append(idx)
                continue
            if rec.route in ("linear", "embedding"):
                f1, f2 = self.factors(rec)
                blocks.append(KroneckerBatch.from_factors(f1, f2) if f1.dim() == 3
                              else KroneckerEigen.from_factors(f1, f2,
                                                               name=f"module {rec.name!r}"))
            else:
                blocks.append(self.other_block(rec))
            indices.append(self.index(rec))
        return BlockDiagonal(blocks, indices)

    def other_block(self, rec: ModuleRecord) -> PSDOperator:
        """The exact block of a record without Kronecker factors: dense, or its diagonal
        above :data:`LOOSE_DENSE_MAX` entries."""
        st = self.state[rec.name]
        if "diag" in st:
            return Diagonal(st["diag"].clone())
        return Dense(0.5 * (st["block"] + st["block"].T))


class EKFACCorrection:
    r"""Second pass of EKFAC (George et al., 2018): keep the K-FAC eigenbases
    :math:`Q_G, Q_A` and replace the eigenvalues by the exact second moments of the
    per-sample gradients in that basis, :math:`s_{ij} = \sum_{k,n} (Q_G^\top V_{kn} Q_A)_{ij}^2`
    with :math:`V_{kn} = \sum_t g_{knt} a_{nt}^\top`. Exact on the diagonal of the eigenbasis;
    equal to the GGN block whenever K-FAC's eigenbasis diagonalises it. ``factor_rank``:
    each (ungrouped, non-diagonal) basis keeps only its top-``factor_rank`` eigenvectors,
    the second moments are taken on the kept basis only (``compute(factor_rank=)``)."""

    def __init__(self, kfac: KFACAccumulator, records: list[ModuleRecord],
                 factor_rank: int | None = None) -> None:
        self.kfac = kfac
        self.bases: dict[str, tuple[Tensor, Tensor]] = {}
        self.scales: dict[str, Tensor] = {}
        for rec in records:
            if rec.route in ("linear", "embedding") and kfac.called(rec):
                f1, f2 = kfac.factors(rec)
                what = f"K-FAC factor of module {rec.name!r}"
                q1 = None if f1.ndim == 1 else robust_eigh(f1, what)[1]  # diagonal: identity
                q2 = robust_eigh(f2, what)[1]  # grouped: batched over the groups
                if factor_rank is not None and q2.dim() == 2:  # eigh ascending: top = last
                    q1, q2 = (q if q is None or q.shape[1] <= factor_rank
                              else q[:, -factor_rank:].clone() for q in (q1, q2))
                self.bases[rec.name] = (q1, q2)
                self.scales[rec.name] = torch.zeros(
                    *f2.shape[:-2], f1.shape[-1] if q1 is None else q1.shape[-1], q2.shape[-1],
                    dtype=f1.dtype, device=f1.device)

    def update(self, records: list[ModuleRecord], first: bool = True) -> None:
        for rec in records:
            if rec.name not in self.bases or not rec.called:
                continue
            q1, q2 = self.bases[rec.name]
            dt = self.kfac.dtype
            if rec.route == "linear":
                if rec.output_hessian is not None:  # output layer: diag(Q_Gᵀ H_b Q_G)
                    lik, f = rec.output_hessian
                    gq = lik.hessian_diagonal(f.to(dt), q1)
                    aq = (rec.linear_inputs()[:, 0, :].to(dt) @ q2).square()
                    self.scales[rec.name] += gq.T @ aq
                    continue
                scale = self.scales[rec.name]
                g = rec.linear_grads()  # grouped: bases (G, n, n), rotations batched over G
                if g.shape[-2] == 1:  # no sharing: (g Q_G)^2ᵀ (a Q_A)^2, one matmul
                    gq = layers.group_matmul(g[..., 0, :].to(dt), q1).square().sum(-3)
                    aq = layers.group_matmul(rec.linear_inputs()[..., 0, :].to(dt), q2)
                    scale += gq.mT @ aq.square()
                    continue
                # sharing: rotate the factors, then square the per-input Jacobians in the
                # eigenbasis, Σ_t (Q_Gᵀ g_t)(Q_Aᵀ a_t)ᵀ, in chunks (never (K, B, O, I) at
                # once); the rotated inputs are kept over the batch's chunks of columns
                work = product_dtype(self.kfac.params.dtype)
                aq = rec.cache.get("ekfac")
                if aq is None:
                    aq = layers.group_matmul(rec.linear_inputs().to(work), q2.to(work))
                    if rec.reuse:
                        rec.cache["ekfac"] = aq
                gq = layers.group_matmul(g.to(work), q1.to(work))
                scale += layers.linear_diag(layers.LinearView(aq, gq),
                                            out_dtype=dt).view(scale.shape)
                continue
            else:
                ps = torch.cat([layers.embedding_per_sample(rec.module, x, g.to(dt))
                                for x, g in zip(rec.inputs, rec.grads)], 1).to(dt)
                # embedding layout is (V, D): rotate with (Q_A over V, Q_G over D)
            rot = (ps if q1 is None else q1.T @ ps) @ q2
            self.scales[rec.name] += rot.square().sum((0, 1))

    def tensors(self) -> list[Tensor]:
        return list(self.scales.values())

    def finalize_blocks(self, records: list[ModuleRecord]) -> BlockDiagonal:
        blocks, indices = [], []
        for rec in records:
            if not self.kfac.called(rec):
                idx = self.kfac.index(rec)
                blocks.append(Diagonal(torch.zeros(idx.numel(), dtype=self.kfac.dtype,
                                                   device=self.kfac.params.device)))
                indices.append(idx)
                continue
            if rec.name in self.bases:
                q1, q2 = self.bases[rec.name]
                cls = KroneckerBatch if q2.dim() == 3 else KroneckerEigen
                blocks.append(cls(q1, q2, self.scales[rec.name]))
            else:
                blocks.append(self.kfac.other_block(rec))
            indices.append(self.kfac.index(rec))
        return BlockDiagonal(blocks, indices)
