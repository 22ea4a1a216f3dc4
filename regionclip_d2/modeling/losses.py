"""The losses of region-text pretraining and of transfer learning (docs/method.md).

All similarities are cosines of L2-normalised vectors divided by a temperature ``tau``
(0.01 in RegionCLIP).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

CONTRASTIVE_FORMS = ("official", "paper")


def cosine_logits(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """``[N, D]``, ``[M, D]`` -> ``[N, M]`` cosine similarities / ``tau`` (a float, or a tensor
    when the temperature is learned, as in CLIP training)."""
    return F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).t() / tau


def pseudo_labels(teacher_logits: torch.Tensor, threshold: float):
    """Teacher region-concept logits ``[R, M]`` (cosine / tau) -> (labels ``[R]``, soft
    labels ``[R, M]``, keep mask ``[R]``). A region is kept when its best concept's
    probability reaches ``threshold``; when none does, all are kept."""
    soft = teacher_logits.softmax(dim=-1)
    best, labels = soft.max(dim=-1)
    keep = best >= threshold
    if not keep.any():
        keep = torch.ones_like(keep)
    return labels, soft, keep


def region_concept_contrastive_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                                    form: str = "official") -> torch.Tensor:
    """Region-concept contrastive loss over the kept regions (docs/method.md, pretraining).

    ``form="official"`` (what the official code computes, and what produced the published
    numbers): each region i is scored against the pseudo concept of every kept region j,
    ``M[i, j] = student_logits[i, labels[j]]`` (a concept appears once per region that
    matched it), ``p = softmax_j M[i, :]`` and the loss is
    ``mean_i -log sum_{j: labels[j] == labels[i]} p[i, j]``.

    ``form="paper"`` (the paper's equation): the softmax runs over the distinct concepts
    matched in the batch, ``-log p(v_i, l_{m_i})`` with each matched concept counted once.

    Args:
        student_logits: ``[R, M]`` student region-concept cosine / tau (over the whole pool).
        labels: ``[R]`` pseudo labels (concept indices).
        form: ``"official"`` | ``"paper"``.
    """
    if form not in CONTRASTIVE_FORMS:
        raise ValueError(f"region contrastive loss form {form!r}: use one of {CONTRASTIVE_FORMS}")
    if labels.numel() == 0:
        return student_logits.sum() * 0.0
    if form == "paper":
        matched, target = torch.unique(labels, return_inverse=True)
        return F.cross_entropy(student_logits[:, matched], target)
    m = student_logits[:, labels]  # [R, R]: region i against region j's pseudo concept
    same = labels[:, None] == labels[None, :]
    positive = torch.logsumexp(m.masked_fill(~same, float("-inf")), dim=1)
    return (torch.logsumexp(m, dim=1) - positive).mean()


def region_concept_distillation_loss(student_logits: torch.Tensor, teacher_soft: torch.Tensor) -> torch.Tensor:
    """``KL(q_t || q)`` averaged over regions; ``q = softmax(student_logits)`` over the pool."""
    if teacher_soft.numel() == 0:
        return student_logits.sum() * 0.0
    log_q = F.log_softmax(student_logits, dim=-1)
    return F.kl_div(log_q, teacher_soft, reduction="batchmean")


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process (gradients flow back to each process's part)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


def image_text_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, tau: float,
                                gather: bool = False) -> torch.Tensor:
    """Symmetric CLIP loss between matching rows of ``image_emb`` ``[B, D]`` and
    ``text_emb`` ``[B, D]``; with ``gather`` the negatives come from every process's batch
    (each process then computes the loss of its own rows against the global batch)."""
    if gather:
        all_img, all_txt = gather_features(image_emb), gather_features(text_emb)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    else:
        all_img, all_txt, rank = image_emb, text_emb, 0
    b = image_emb.shape[0]
    target = torch.arange(b, device=image_emb.device) + rank * b
    logits_i = cosine_logits(image_emb, all_txt, tau)  # [B, B_global]
    logits_t = cosine_logits(text_emb, all_img, tau)
    return (F.cross_entropy(logits_i, target) + F.cross_entropy(logits_t, target)) / 2
