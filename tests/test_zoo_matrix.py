"""The zoo matrix: tiny torchvision / timm / Hugging Face / PEFT models (``zoo_models``) in
every structure, without ``unknown_layers=``.

- float64, against dense ``torch.func`` truth: the full GGN and the exact diagonal equal
  ``Σ_n J_nᵀ H_n J_n`` (so loose parameters — class tokens, position codes and embeddings of
  ``arange`` positions, layer-scale gammas — get their exact per-sample gradients), the
  linearized predictive of every structure equals ``J Σ Jᵀ`` with ``Σ`` the inverse of the
  posterior's own precision, and the evidence of the full posterior equals its dense formula;
- float32: every structure fits, tunes the prior by the evidence and predicts.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import zoo_models

from bayescurv import Laplace
from bayescurv.errors import UnsupportedLayerError

pytestmark = pytest.mark.filterwarnings("ignore")

STRUCTURES = ("full", "diag", "kfac", "kfac-reduce", "ekfac", "lowrank", "diag+lowrank")
DENSE = ("tv_vit", "tv_convnext", "timm_vit", "timm_relpos", "timm_convnext", "hf_bert", "hf_gpt2",
         "hf_llama", "hf_llama_lm", "peft_bert")


def _rtol(name: str) -> float:
    """Hugging Face's ``LlamaRMSNorm`` computes in float32 whatever the model's dtype (it
    casts its input ``.to(torch.float32)``), so a float64 Llama carries float32 rounding in
    the reference and in the engine alike (relative differences ~1e-7, measured)."""
    return 1e-5 if "llama" in name else 1e-9


def _fit(name, structure, dtype=torch.float64, prior=0.5):
    model, x, loader, opts = zoo_models.build(name, dtype)
    y_key = opts.pop("y_key", "y")
    subset = opts.pop("subset", "all")
    la = Laplace(model, "classification", subset=subset, structure=structure,
                 prior_precision=prior, rank=5, **opts)
    la.fit(loader, y_key=y_key, progress=False)
    return la, x, loader, y_key


def _call(la, v, x):
    if isinstance(x, dict):
        return la.params.functional_call(v, **x)
    return la.params.functional_call(v, x)


def _dense(la, x):
    """``(J (N, C, P), GGN (P, P), f (N, C))`` at the MAP, by ``torch.func``."""
    theta = la.params.vector()
    jac = torch.func.jacrev(lambda v: _call(la, v, x))(theta)
    with torch.no_grad():
        f = _call(la, theta, x)
    p = f.softmax(-1)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return jac, torch.einsum("ncp,ncd,ndq->pq", jac, hess, jac), f


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "ekfac", "lowrank"])
@pytest.mark.parametrize("name", DENSE)
def test_zoo_against_dense_truth(name, structure):
    la, x, _, _ = _fit(name, structure)
    jac, ggn, _ = _dense(la, x)
    if structure == "full":
        err = (la.curvature.to_dense() - ggn).abs().max() / ggn.abs().max()
        assert err < _rtol(name)
    if structure == "diag":
        err = (la.curvature.diagonal() - ggn.diagonal()).abs().max() / ggn.diagonal().max()
        assert err < _rtol(name)
    js = jac[:3].reshape(-1, jac.shape[-1])
    ref = js @ torch.linalg.solve(la.posterior_precision.to_dense(), js.T)
    xs = {k: v[:3] for k, v in x.items()} if isinstance(x, dict) else x[:3]
    _, joint = la.functional(xs, joint=True)
    assert (joint - ref).abs().max() <= 10 * _rtol(name) * ref.abs().max()
    _, var = la.functional(xs)  # the per-input blocks (a separate code path)
    blocks = torch.stack([ref.reshape(3, -1, 3, ref.shape[-1] // 3)[i, :, i] for i in range(3)])
    assert (var - blocks).abs().max() <= 10 * _rtol(name) * ref.abs().max()


@pytest.mark.parametrize("name", ["timm_vit", "hf_gpt2", "peft_bert"])
def test_zoo_full_evidence_equals_dense_formula(name):
    la, x, loader, y_key = _fit(name, "full", prior=0.7)
    _, ggn, f = _dense(la, x)
    y = torch.cat([b[1] if isinstance(b, tuple) else b[y_key] for b in loader])
    nll = torch.nn.functional.cross_entropy(f, y, reduction="sum")
    theta = la.params.vector()
    p = theta.numel()
    ref = (-nll - 0.5 * 0.7 * theta.square().sum() + 0.5 * p * math.log(0.7)
           - 0.5 * torch.logdet(ggn + 0.7 * torch.eye(p, dtype=ggn.dtype)))
    assert torch.allclose(la.log_marginal_likelihood(), ref, rtol=1e-9, atol=1e-8)


MATRIX = [(n, s) for n in zoo_models.MODELS for s in STRUCTURES
          if (n, s) != ("tv_mobilenet", "full")]
"""Every model in every structure; MobileNetV3's ``full`` (32k parameters: a dense 8 GB GGN
and its eigendecomposition) runs in the slow suite instead."""


@pytest.mark.parametrize(("name", "structure"), [
    *MATRIX, pytest.param("tv_mobilenet", "full", marks=pytest.mark.slow)])
def test_zoo_every_structure_fits_tunes_predicts_float32(name, structure):
    la, x, _, _ = _fit(name, structure, dtype=torch.float32, prior=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.optimize_prior_precision(n_steps=20)
    assert torch.isfinite(la.log_marginal_likelihood())
    probs = la.predict(x)
    assert probs.shape == (zoo_models.N, zoo_models.CLASSES)
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(-1), torch.ones(zoo_models.N), atol=1e-5)


def test_timm_vit_last_layer_is_the_head_not_the_root():
    la, *_ = _fit("timm_vit", "kfac")
    model, x, loader, _ = zoo_models.build("timm_vit")
    la = Laplace(model, "classification", subset="last_layer").fit(loader, progress=False)
    assert la.last_layer_name == "head"
    assert la.params.names == ["head.weight", "head.bias"]


def test_broadcast_parameter_used_across_the_batch_is_refused():
    class Mixer(torch.nn.Module):  # a (1, D) parameter reduced over its first dimension
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.token = torch.nn.Parameter(torch.randn(1, 4))

        def forward(self, x):
            return self.lin(x + self.token.sum(0, keepdim=True))

    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(UnsupportedLayerError, match="broadcasting"):
        Laplace(Mixer(), "classification", structure="diag").fit([(x, y)], progress=False)


def test_generic_module_coupling_the_batch_is_refused():
    class Center(torch.nn.Module):  # subtracts the batch mean: couples the data points
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return (x - x.mean(0)) * self.scale

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Center(), torch.nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(UnsupportedLayerError, match="couples the data points"):
        Laplace(model, "classification", structure="kfac").fit([(x, y)], progress=False)
    # the previous opt-in route keeps working unchecked; "error" refuses the module
    with pytest.raises(UnsupportedLayerError, match="does not know"):
        Laplace(model, "classification", structure="kfac",
                unknown_layers="error").fit([(x, y)], progress=False)


def test_per_sample_route_keeps_no_autograd_history_across_batches():
    """The memory growth users saw with ``unknown_layers='per_sample'`` (1.5 GB after one
    batch, 4.9 GB after eight on a ViT): the per-sample gradients of a generic module carried
    autograd history into the in-place running sums, so every batch's graph stayed alive."""
    from bayescurv.curvature import accumulate, engine

    model, x, loader, _ = zoo_models.build("timm_convnext", torch.float32)
    seen = []
    orig = accumulate.KFACAccumulator.update

    def spy(self, records, first=True):
        orig(self, records, first)
        seen.extend(t.requires_grad for st in self.state.values() for t in st.values())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(accumulate.KFACAccumulator, "update", spy)
        Laplace(model, "classification", structure="kfac").fit(loader * 3, progress=False)
    assert seen and not any(seen)
    assert engine.UNKNOWN_LAYERS[0] == "auto"


@pytest.mark.slow
def test_torchvision_resnet18_all_weights_kfac_tunes_without_lapack_error():
    """The reported failure: all-weights K-FAC of a torchvision ResNet-18 on 32x32 inputs
    fitted, then ``optimize_prior_precision`` died in ``linalg.eigh`` on the 4608 x 4608
    input factor of ``layer4.1.conv1`` (a 3x3 conv on a 1x1 map: 4096 zero rows)."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    zoo_models._bn_stats(model)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    la = Laplace(model, "classification", structure="kfac").fit([(x, y)], progress=False)
    la.optimize_prior_precision(n_steps=5)
    assert torch.isfinite(la.log_marginal_likelihood())


def test_last_token_reads_the_attention_mask_for_right_and_left_padding():
    from bayescurv.params import last_token

    logits = torch.arange(2 * 4 * 5, dtype=torch.float64).reshape(2, 4, 5)

    class Out(dict):
        pass

    right = {"attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])}
    left = {"attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])}
    sel = last_token(tokens=[4, 1])
    assert torch.equal(sel(Out(logits=logits), right), logits[[0, 1], [1, 3]][:, [4, 1]])
    assert torch.equal(sel(Out(logits=logits), left), logits[[0, 1], [3, 3]][:, [4, 1]])
    assert torch.equal(last_token()(Out(logits=logits), logits), logits[:, -1])


def test_causal_lm_predictive_ignores_right_padding():
    """The posterior over a causal LM read at the last real token: a right-padded sequence
    has exactly the predictive of the same sequence without padding (the padded positions
    never enter the curvature, the evidence or the predictive)."""
    la, x, _, _ = _fit("hf_llama_lm", "kfac")
    padded = {k: v[:1] for k, v in x.items()}  # zoo_models pads the first two on the right
    assert int(padded["attention_mask"].sum()) == 3
    short = {k: v[:, :3] for k, v in padded.items()}
    m1, v1 = la.functional(padded)
    m2, v2 = la.functional(short)
    torch.testing.assert_close(m1, m2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("structure", ["kfac", "kfac-reduce", "diag"])
@pytest.mark.parametrize("name", ["hf_bert", "hf_gpt2", "hf_llama"])
def test_padding_changes_no_structure(name, structure):
    """A padded batch and the same sequences one at a time, unpadded, give the same
    curvature: padded positions never reach the output (attention mask, last-token pooling),
    and K-FAC leaves them out of its input factor and count."""
    model, x, loader, opts = zoo_models.build(name)
    y_key = opts.pop("y_key")
    single = []
    for batch in loader:
        for i in range(batch["labels"].shape[0]):
            keep = int(batch["attention_mask"][i].sum())
            single.append({k: v[i:i + 1, :keep] if v.dim() == 2 else v[i:i + 1]
                           for k, v in batch.items()})
    curv = []
    for data in (loader, single):
        la = Laplace(model, "classification", structure=structure, **opts)
        curv.append(la.fit(data, y_key=y_key, progress=False).curvature.to_dense())
    torch.testing.assert_close(curv[0], curv[1], rtol=_rtol(name) * 10, atol=1e-10)
