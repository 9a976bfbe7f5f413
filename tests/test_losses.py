import math

import torch

from edgekd.losses import FeatureProjection, soft_target_loss
from edgekd.objective import Batch, ObjectiveConfig, compute


def kd_loss(s, t, y, T, alpha):
    """The objective's kd + ce terms: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)."""
    return compute(Batch(s, y, teacher_logits=t), ObjectiveConfig(T, alpha))


def _hand_kd(s, t, y, T, alpha):
    """The Hinton loss written out sample by sample with plain math."""
    total_soft, total_hard = 0.0, 0.0
    for si, ti, yi in zip(s.tolist(), t.tolist(), y.tolist(), strict=False):
        zs = sum(math.exp(v / T) for v in si)
        zt = sum(math.exp(v / T) for v in ti)
        ps = [math.exp(v / T) / zs for v in si]
        pt = [math.exp(v / T) / zt for v in ti]
        total_soft += sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=False))
        z1 = sum(math.exp(v) for v in si)
        total_hard += -math.log(math.exp(si[yi]) / z1)
    n = len(y)
    return alpha * T * T * total_soft / n + (1 - alpha) * total_hard / n


def test_kd_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g) * 3
    y = torch.tensor([0, 1, 2, 3, 1])
    for T, alpha in [(1.0, 0.5), (4.0, 0.9), (20.0, 0.3)]:
        assert math.isclose(kd_loss(s, t, y, T, alpha).item(), _hand_kd(s, t, y, T, alpha), rel_tol=1e-5)


def test_soft_term_gradient_scale_is_independent_of_temperature():
    # Without T^2 the soft gradient shrinks as 1/T^2; with it, high-T gradients stay the same order.
    g = torch.Generator().manual_seed(1)
    t = torch.randn(64, 10, generator=g)
    s0 = torch.randn(64, 10, generator=g)
    norms = {}
    for T in (2.0, 8.0, 32.0):
        s = s0.clone().requires_grad_(True)
        soft_target_loss(s, t, T).backward()
        norms[T] = s.grad.norm().item()
    # For large T, d/ds [T^2 KL] -> (s - t)/(N_classes*T)*... ~ 1/T; the 1/T^2 factor is gone.
    assert norms[32.0] * 32 / (norms[8.0] * 8) > 0.8
    s = s0.clone().requires_grad_(True)
    (soft_target_loss(s, t, 8.0) / 64).backward()   # what the gradient would be without T^2
    assert s.grad.norm().item() < norms[8.0] / 32


def test_kd_loss_zero_when_student_equals_teacher_and_alpha_one():
    t = torch.randn(3, 5)
    assert kd_loss(t.clone(), t, torch.tensor([0, 1, 2]), 4.0, 1.0).item() < 1e-6


def test_unlabelled_samples_only_get_soft_term():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y_partial = torch.tensor([0, -1, -1, 2])
    loss = kd_loss(s, t, y_partial, 2.0, 0.5)
    expected = 0.5 * soft_target_loss(s, t, 2.0) + 0.5 * torch.nn.functional.cross_entropy(s[[0, 3]], y_partial[[0, 3]])
    assert torch.allclose(loss, expected)
    assert torch.allclose(kd_loss(s, t, None, 2.0, 0.5), soft_target_loss(s, t, 2.0))


def test_feature_projection_maps_widths():
    proj = FeatureProjection(8, 16, spatial=True)
    out = proj(torch.randn(2, 8, 4, 4))
    assert out.shape == (2, 16, 4, 4)
    assert isinstance(FeatureProjection(5, 5, spatial=False).proj, torch.nn.Identity)
