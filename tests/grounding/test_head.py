"""The grounding head's pieces: alignment logits, class scores, token targets, focal loss,
deep fusion; and that together they learn to ground."""
import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from regionclip_d2.grounding.head import (
    MASKED_LOGIT,
    BiCrossAttentionLayer,
    DeepFusion,
    RegionTokenAlignment,
    class_scores,
    grounding_focal_loss,
    token_targets,
)


def test_alignment_equals_the_hand_computation_and_masks_padding():
    torch.manual_seed(0)
    head = RegionTokenAlignment(6, 5, dim=4, prior_prob=0.01, init_scale=10.0)
    regions, tokens = torch.randn(2, 3, 6), torch.randn(2, 7, 5)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out = head(regions, tokens, mask)
    o = torch.nn.functional.normalize(head.visual_proj(regions), dim=-1)
    p = torch.nn.functional.normalize(head.text_proj(tokens), dim=-1)
    want = 10.0 * o @ p.transpose(1, 2) - math.log(99.0)
    assert torch.allclose(out[0], want[0], atol=1e-5)
    assert torch.allclose(out[1, :, :4], want[1, :, :4], atol=1e-5)
    assert (out[1, :, 4:] == MASKED_LOGIT).all()
    # at the start every real token has probability within a factor exp(+-10) of the prior
    assert float(out[0].detach().sigmoid().mean()) < 0.2
    out.sum().backward()
    assert head.bias.grad is not None and head.log_scale.grad is not None


def test_alignment_rejects_mismatched_inputs():
    head = RegionTokenAlignment(6, 5, dim=4)
    with pytest.raises(ValueError, match="one prompt per image"):
        head(torch.randn(3, 2, 6), torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match="one flag per token"):
        head(torch.randn(2, 2, 6), torch.randn(2, 7, 5), torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="prior_prob"):
        RegionTokenAlignment(6, 5, prior_prob=1.0)


def test_class_scores_mean_and_max_over_each_span():
    logits = torch.tensor([[0.0, 2.0, -2.0, 1.0, 5.0]])
    pm = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.float32)
    p = logits.sigmoid()[0]
    mean = class_scores(logits, pm, "mean")
    mx = class_scores(logits, pm, "max")
    assert torch.allclose(mean, torch.tensor([[(p[1] + p[2]) / 2, p[3]]]))
    assert torch.allclose(mx, torch.tensor([[p[1], p[3]]]))
    with pytest.raises(ValueError, match="non-empty span"):
        class_scores(logits, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="'mean', 'max' or 'last'"):
        class_scores(logits, pm, "sum")


def test_token_targets_of_foreground_and_background():
    pm = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.float32) / 2  # a normalised map binarises
    labels = torch.tensor([1, 0, 2, -1])  # 2 = num_classes = background in detectron2
    t = token_targets(labels, pm)
    assert t.tolist() == [[0, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_focal_loss_matches_torchvision_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6)
    targets = torch.zeros(2, 3, 6)
    targets[0, 0, 1:3] = 1
    targets[1, 2, 4] = 1
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 5] = False
    loss = grounding_focal_loss(logits, targets, mask)
    want = (sigmoid_focal_loss(logits, targets, reduction="none") * mask[:, None, :]).sum() / 2  # 2 positive regions
    assert torch.allclose(loss, want)
    changed = logits.clone()
    changed[:, :, 5] = 50.0  # a padding position, confidently "positive": no effect
    assert torch.allclose(grounding_focal_loss(changed, targets, mask), loss)
    with pytest.raises(ValueError, match="differ in shape"):
        grounding_focal_loss(logits, targets[:, :2])


def test_fusion_with_zero_layers_is_the_identity_and_padding_does_not_leak():
    torch.manual_seed(0)
    v, t = torch.randn(2, 5, 8), torch.randn(2, 6, 4)
    assert all(a is b for a, b in zip(DeepFusion(8, 4, num_layers=0)(v, t), (v, t)))
    fusion = DeepFusion(8, 4, num_layers=2, embed_dim=8, num_heads=2, init_gamma=1.0).eval()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    v1, t1 = fusion(v, t, mask)
    t2 = t.clone()
    t2[:, 4:] = 100.0  # what sits at padding positions must not reach the visual side or real tokens
    v2, t2o = fusion(v, t2, mask)
    assert torch.allclose(v1, v2, atol=1e-5) and torch.allclose(t1[:, :4], t2o[:, :4], atol=1e-5)
    assert not torch.allclose(v1, v, atol=1e-3)  # with gamma 1 the text changes the visual tokens


def test_fusion_is_equivariant_to_the_order_of_visual_tokens():
    torch.manual_seed(0)
    layer = BiCrossAttentionLayer(8, 4, embed_dim=8, num_heads=2, init_gamma=1.0).eval()
    v, t = torch.randn(1, 5, 8), torch.randn(1, 3, 4)
    perm = torch.tensor([3, 0, 4, 1, 2])
    v1, t1 = layer(v, t)
    v2, t2 = layer(v[:, perm], t)
    assert torch.allclose(v1[:, perm], v2, atol=1e-5) and torch.allclose(t1, t2, atol=1e-5)


@pytest.mark.parametrize("layers", [0, 1])
def test_alignment_and_fusion_learn_to_ground(layers):
    """Regions are noisy copies of 4 class prototypes; each image's prompt names the 4
    classes in a shuffled order (token spans of 1-2 tokens, padding after). After training
    with the focal loss, every region's highest class score is its own class, wherever the
    class sits in the prompt."""
    g = torch.Generator().manual_seed(0)
    num_classes, dv, dt, length = 4, 12, 10, 9
    protos = torch.randn(num_classes, dv, generator=g)
    word = torch.randn(num_classes, 2, dt, generator=g)  # each class name: 2 token embeddings
    spans = [(1, 3), (3, 4), (4, 6), (6, 7)]  # slot k holds a name of 2, 1, 2, 1 tokens

    def batch(n):
        regions, tokens, pms, labels = [], [], [], []
        for _ in range(n):
            order = torch.randperm(num_classes, generator=g)  # order[k]: the class in slot k
            tok = torch.zeros(length, dt)
            pm = torch.zeros(num_classes, length)  # rows in class order
            for k, (a, b) in enumerate(spans):
                c = int(order[k])
                tok[a:b] = word[c, : b - a]
                pm[c, a:b] = 1
            lab = torch.randint(0, num_classes, (6,), generator=g)
            regions.append(protos[lab] + 0.3 * torch.randn(6, dv, generator=g))
            tokens.append(tok)
            pms.append(pm)
            labels.append(lab)
        mask = torch.zeros(n, length, dtype=torch.bool)
        mask[:, : spans[-1][1] + 1] = True
        return torch.stack(regions), torch.stack(tokens), mask, pms, labels

    torch.manual_seed(0)
    align = RegionTokenAlignment(dv, dt, dim=16)
    fusion = DeepFusion(dv, dt, num_layers=layers, embed_dim=16, num_heads=2)
    opt = torch.optim.Adam(list(align.parameters()) + list(fusion.parameters()), lr=0.02)
    for _ in range(150):
        regions, tokens, mask, pms, labels = batch(8)
        v, t = fusion(regions, tokens, mask)
        logits = align(v, t, mask)
        targets = torch.stack([token_targets(lab, pm) for lab, pm in zip(labels, pms)])
        loss = grounding_focal_loss(logits, targets, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    regions, tokens, mask, pms, labels = batch(16)
    with torch.no_grad():
        logits = align(*fusion(regions, tokens, mask), mask)
    pred = torch.stack([class_scores(logits[i], pms[i]).argmax(-1) for i in range(16)])
    assert (pred == torch.stack(labels)).float().mean() == 1.0
