"""The forms of L_old against a float64 loop written from their definitions, value and gradient."""

import pytest
import torch

from mixda_fast.training.losses import OLD_LOSSES, old_knowledge_loss


def _reference(captures, mask, form):
    """sum over layers of the mean over real tokens of the per-token distance, / layers (float64)."""
    layers = []
    for y, f in captures:
        values = []
        for b in range(y.shape[0]):
            for t in range(y.shape[1]):
                if mask is not None and mask[b, t] == 0:
                    continue
                d = y[b, t].double() - f[b, t].double()
                sq = (d * d).sum()
                values.append({"mse": sq / y.shape[-1], "paper": sq,
                               "relative": sq / (f[b, t].double() ** 2).sum()}[form])
        layers.append(torch.stack(values).mean())
    return torch.stack(layers).mean()


def _captures(seed=0, layers=3, B=2, T=5, D=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(B, T, D, generator=g, dtype=torch.float64)) for _ in range(layers)]


@pytest.mark.parametrize("form", OLD_LOSSES)
@pytest.mark.parametrize("masked", [False, True])
def test_value_and_gradient_match_the_definition(form, masked):
    caps = _captures()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]) if masked else None
    got = old_knowledge_loss(caps, mask, form)
    want = _reference(caps, mask, form)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)       # the loss computes in float32
    g_got = torch.autograd.grad(got, [y for y, _ in caps])
    g_want = torch.autograd.grad(want, [y for y, _ in caps])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        if masked:
            assert torch.count_nonzero(a[1, 2:]) == 0                       # padding gets no gradient


def test_forms_relate_as_defined():
    caps = _captures(seed=1)
    mse, paper = old_knowledge_loss(caps, None, "mse"), old_knowledge_loss(caps, None, "paper")
    torch.testing.assert_close(paper, mse * caps[0][0].shape[-1])
    scaled = [(3.0 * y, 3.0 * f) for y, f in caps]                         # relative is scale-free
    torch.testing.assert_close(old_knowledge_loss(scaled, None, "relative"), old_knowledge_loss(caps, None, "relative"))
    with pytest.raises(ValueError, match="form='l1' is not accepted"):
        old_knowledge_loss(caps, None, "l1")
