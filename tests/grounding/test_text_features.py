"""Per-token text features: ln_final + text_projection on every position of a tiny open_clip
text tower built in-process; the end-of-text feature is encode_text's; frozen by default."""
import pytest
import torch

from regionclip_d2.grounding.prompts import build_class_prompts, caption_prompt
from regionclip_d2.grounding.text_features import TokenFeatureEncoder, token_features

TOL = dict(atol=1e-5, rtol=1e-5)  # float32, same operations in another order of slicing


@pytest.fixture
def encoder(tiny_text_encoder):
    return tiny_text_encoder


def test_eot_feature_equals_encode_text_and_tokens_are_projected(tiny_clip, encoder):
    texts = ["a photo of a cat.", "two red stars next to a blue ring", ""]
    ids = encoder.tokenize(texts)
    out = TokenFeatureEncoder(encoder)(ids)
    assert out["tokens"].shape == (3, 24, 64) and out["mask"].shape == (3, 24) and out["eot"].shape == (3, 64)
    with torch.no_grad():
        ref = tiny_clip.encode_text(ids)
        # every position by hand through open_clip's own modules (full length, no slicing)
        x = tiny_clip.token_embedding(ids) + tiny_clip.positional_embedding
        x = tiny_clip.ln_final(tiny_clip.transformer(x, attn_mask=tiny_clip.attn_mask)) @ tiny_clip.text_projection
    torch.testing.assert_close(out["eot"], ref, **TOL)
    eot = ids.argmax(-1)
    for n in range(3):
        e = int(eot[n])
        torch.testing.assert_close(out["tokens"][n, e], ref[n], **TOL)
        torch.testing.assert_close(out["tokens"][n, :e + 1], x[n, :e + 1], **TOL)
        assert out["mask"][n].tolist() == [i <= e for i in range(24)]
        assert not out["tokens"][n, e + 1:].any()  # padding after end-of-text: zeros


def test_frozen_by_default(encoder):
    enc = TokenFeatureEncoder(encoder)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training and not encoder.training  # the frozen tower stays in eval mode
    out = enc(encoder.tokenize(["a dog"]))
    assert not out["tokens"].requires_grad and out["tokens"].grad_fn is None


def test_trainable_switch(encoder):
    enc = TokenFeatureEncoder(encoder, trainable=True).train()
    assert all(p.requires_grad for p in enc.parameters()) and encoder.training
    out = enc(encoder.tokenize(["a dog", "a red mug"]))
    (out["tokens"].sum() + out["eot"].sum()).backward()
    assert encoder.token_embedding.weight.grad is not None and encoder.text_projection.grad.abs().sum() > 0
    assert token_features(encoder, encoder.tokenize(["x"]))["tokens"].grad_fn is None  # frozen again


def test_prompts_index_the_tower_positions(encoder):
    """A prompt's token span selects the tower outputs of that phrase's tokens: the same
    features as the phrase's tokens in a prompt of its own (causal tower: the features of a
    first phrase do not depend on what follows it)."""
    tok = encoder.tokenizer
    prompts = build_class_prompts(["circle", "red mug", "square", "blue moon", "star"], tok)
    enc = TokenFeatureEncoder(encoder)
    feats = enc.encode_prompts(prompts)["tokens"]
    assert feats.shape == (len(prompts), 24, 64)
    alone = enc.encode_prompts(build_class_prompts(["circle"], tok))["tokens"][0]
    assert len(prompts) == 1 and prompts[0].token_spans[0] == (1, 2)  # "circle" opens the prompt
    torch.testing.assert_close(feats[0, 1:2], alone[1:2], **TOL)
    assert prompts[0].token_spans[1] == (3, 5)  # <sot> circle . red mug .
    cap = caption_prompt("a red mug next to a blue ring", tok)
    out = enc.encode_prompts([cap])
    a, b = cap.token_spans[0]
    assert cap.phrases[0] == "red mug" and out["mask"][0, a:b].all()
    with pytest.raises(ValueError, match="context_length=24"):
        enc.encode_prompts(build_class_prompts(["dog"], tok, context_length=30))
