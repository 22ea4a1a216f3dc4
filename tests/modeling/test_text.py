import logging
import os

import pytest
import torch

from regionclip_d2.modeling.text import (
    LanguageEncoder,
    build_tokenizer,
    embed_class_names,
    get_templates,
    load_text_embeddings,
)


@pytest.fixture
def encoder(tiny_text_encoder):
    return tiny_text_encoder


def test_language_encoder_equals_open_clip_encode_text(tiny_clip, encoder):
    tokens = encoder.tokenize(["a photo of a cat.", "two red stars next to a blue ring", ""])
    with torch.no_grad():
        torch.testing.assert_close(encoder(tokens), tiny_clip.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_all_tokens_output(encoder):
    tokens = encoder.tokenize(["a dog"])
    eot, per_token = encoder(tokens, all_tokens=True)
    assert per_token.shape == (1, encoder.context_length, 64)
    torch.testing.assert_close(per_token[0, tokens[0].argmax()], eot[0])


def test_templates():
    assert len(get_templates("imagenet80")) == 80
    assert all(t.count("{}") == 1 for t in get_templates("imagenet80"))
    assert get_templates("single") == ["a photo of a {}."]
    assert get_templates("a sketch of {}") == ["a sketch of {}"]
    with pytest.raises(ValueError, match="unknown prompt templates"):
        get_templates("imagenet81")


def test_embed_class_names_is_the_normalised_template_mean(encoder):
    emb = embed_class_names(["cat", "traffic_light"], encoder, templates="imagenet80", use_cache=False)
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    # by hand for the second name (underscores become spaces in prompts)
    prompts = [t.format("traffic light") for t in get_templates("imagenet80")]
    with torch.no_grad():
        f = torch.nn.functional.normalize(encoder(encoder.tokenize(prompts)), dim=-1).mean(0)
    torch.testing.assert_close(emb[1], torch.nn.functional.normalize(f, dim=0), atol=1e-5, rtol=1e-5)


def test_prompts_are_embedded_by_template_and_name_length_with_the_same_result(encoder, tmp_path):
    """Batches hold the prompts of few templates (whose shared beginning is computed once) and
    names of similar length (each batch is computed up to its longest prompt); the embeddings
    equal a name-by-name computation of whole prompts, and a progress file written in another
    order (an older version's) is not resumed."""
    from regionclip_d2.modeling.text import embedding as E

    names = ["ox", "a rather long class name with many words in it", "cat", "traffic_light", "an elephant seal"]
    tmpl = get_templates("imagenet80")
    order = E._length_order(names, tmpl, encoder)
    assert sorted(order.tolist()) == list(range(len(names) * len(tmpl)))
    name_len = [len(encoder.tokenizer.encode(n.replace("_", " "))) for n in names]
    keys = [(j % len(tmpl), name_len[j // len(tmpl)]) for j in order.tolist()]
    assert keys == sorted(keys)  # by template, then by the name's token count
    got = embed_class_names(names, encoder, templates="imagenet80", use_cache=False, batch_size=64)
    for i, n in enumerate(names):
        with torch.no_grad():
            f = torch.nn.functional.normalize(encoder(encoder.tokenize([t.format(n.replace("_", " ")) for t in tmpl])),
                                              dim=-1).mean(0)
        torch.testing.assert_close(got[i], torch.nn.functional.normalize(f, dim=0), atol=1e-5, rtol=1e-5)
    # a progress file from a version that embedded prompts in name order: started over, not mixed in
    path = E._cache_path(str(tmp_path), encoder, names, tmpl)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"done": 64, "sums": torch.full((len(names), 64), 7.0)}, path + ".partial")
    again = embed_class_names(names, encoder, templates="imagenet80", cache_dir=str(tmp_path), batch_size=64)
    torch.testing.assert_close(again, got, atol=1e-5, rtol=1e-5)


def test_embedding_cache_hits_and_keys(encoder, tmp_path, monkeypatch):
    calls = []  # every computed prompt batch is tokenized first (whole or after its template's prefix)
    orig = LanguageEncoder.tokenize

    def counting(self, texts):
        calls.append(len(texts))
        return orig(self, texts)

    monkeypatch.setattr(LanguageEncoder, "tokenize", counting)
    a = embed_class_names(["cat", "dog"], encoder, templates="single", cache_dir=str(tmp_path))
    n = len(calls)
    b = embed_class_names(["cat", "dog"], encoder, templates="single", cache_dir=str(tmp_path))
    assert len(calls) == n  # served from the cache
    torch.testing.assert_close(a, b)
    embed_class_names(["cat", "dog"], encoder, templates="none", cache_dir=str(tmp_path))
    assert len(calls) > n  # templates are part of the key
    n = len(calls)
    with torch.no_grad():
        encoder.text_projection.mul_(2.0)  # new weights -> new key
    embed_class_names(["cat", "dog"], encoder, templates="single", cache_dir=str(tmp_path))
    assert len(calls) > n
    assert len(list((tmp_path / "text_embeddings").glob("*.pth"))) == 3


def test_texts_encoded_after_a_shared_prefix_equal_whole_texts(encoder):
    """encode_after_prefix: the prefix's states computed once give each text's end-of-text
    embedding as the whole text does; a prompt whose tokens do not begin with its template's
    prefix (the name joined to the template's last word) is encoded whole, with the same result."""
    from regionclip_d2.modeling.text import embedding as E

    assert encoder.can_share_prefix()
    texts = ["a photo of a cat.", "a photo of a traffic light in the rain", "a photo of a x"]
    tokens = encoder.tokenize(texts)
    prefix = encoder.tokenize(["a photo of a"])[0]
    p = int(prefix.argmax())
    with torch.no_grad():
        want = encoder(tokens)
    got = encoder.encode_after_prefix(prefix[:p], tokens[:, p:])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    templates = ["a photo of a {}.", "x{}y", "{} in the wild"]
    prefixes = E._template_prefixes(templates, encoder)
    assert prefixes[2] is not None and len(prefixes[2]) == 1  # the start-of-text token alone
    names = ["cat", "ray", "dog"]
    prompts = [t.format(n) for n in names for t in templates]
    whole = []
    orig = type(encoder).forward

    def spy(self, tok, all_tokens=False):
        whole.append(tok.shape[0])
        return orig(self, tok, all_tokens)

    idx = torch.arange(len(prompts))
    type(encoder).forward = spy
    try:
        got = E._encode_prompts(encoder, idx, prompts, prefixes)
    finally:
        type(encoder).forward = orig
    with torch.no_grad():
        want = encoder(encoder.tokenize(prompts))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    x_prefix_ok = (encoder.tokenize(["xcat"])[0][:len(prefixes[1])] == prefixes[1]).all()
    assert sum(whole) == (0 if x_prefix_ok else 3)  # only the glued template's prompts went whole


def test_class_name_longer_than_context_is_truncated(encoder, caplog):
    long_name = " ".join(["enormous"] * 60)
    with caplog.at_level(logging.WARNING):
        emb = embed_class_names([long_name, "cat"], encoder, templates="single", use_cache=False)
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()
    assert "truncated" in caplog.text


def test_bad_vocabularies(encoder):
    with pytest.raises(ValueError, match="empty"):
        embed_class_names([], encoder)
    with pytest.raises(ValueError, match="duplicate class names \\['cat'\\]"):
        embed_class_names(["cat", "dog", "cat"], encoder)


def test_load_text_embeddings_checks_dimension(tmp_path):
    path = tmp_path / "emb.pth"
    torch.save(torch.randn(5, 512), path)
    with pytest.raises(ValueError, match="dim 512 but the backbone produces 1024: set MODEL.CLIP.TEXT_EMB_PATH"):
        load_text_embeddings(str(path), 1024)
    assert load_text_embeddings(str(path), 512).shape == (5, 512)
    with pytest.raises(FileNotFoundError, match="tools/embed_vocabulary.py"):
        load_text_embeddings(str(tmp_path / "none.pth"), 512)


def test_tokenizer_context_length(tiny_clip_config):
    tok = build_tokenizer("", tiny_clip_config)
    assert tok(["hello"]).shape == (1, 24)


class _Interrupt(Exception):
    pass


def test_large_vocabulary_streams_resumes_and_survives_an_unwritable_cache(encoder, tmp_path, monkeypatch, caplog):
    from regionclip_d2.modeling.text import embedding as E

    names = [f"thing {i}" for i in range(40)]
    want = embed_class_names(names, encoder, templates="imagenet80", use_cache=False, batch_size=64)
    # interrupted after 10 batches, with progress saved every 128 prompts
    calls = []
    orig = E._encode_prompts

    def flaky(enc, idx, *args):
        calls.append(len(idx))
        if len(calls) == 10:
            raise _Interrupt()
        return orig(enc, idx, *args)

    monkeypatch.setattr(E, "_encode_prompts", flaky)
    with pytest.raises(_Interrupt):
        embed_class_names(names, encoder, cache_dir=str(tmp_path), batch_size=64, checkpoint_every=128)
    partial = list((tmp_path / "text_embeddings").glob("*.partial"))
    assert len(partial) == 1
    calls.clear()
    monkeypatch.setattr(E, "_encode_prompts", lambda enc, idx, *a: (calls.append(len(idx)), orig(enc, idx, *a))[1])
    got = embed_class_names(names, encoder, cache_dir=str(tmp_path), batch_size=64, checkpoint_every=128)
    assert sum(calls) == 40 * 80 - 512  # resumed after the 512 prompts saved before the interruption
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not list((tmp_path / "text_embeddings").glob("*.partial"))
    # an unwritable cache: a warning, the embeddings all the same, no temporary left behind
    def no_space(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E.torch, "save", no_space)
    with caplog.at_level(logging.WARNING):
        again = embed_class_names(names[:3], encoder, templates="single", cache_dir=str(tmp_path / "full"))
    assert again.shape == (3, 64) and "continuing without it" in caplog.text
    assert not [p for p in (tmp_path / "full").rglob("*") if p.name.endswith(".tmp")]


def test_orphaned_cache_temporaries_are_removed(encoder, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    folder = tmp_path / "text_embeddings"
    folder.mkdir()
    orphan = folder / f"abc.pth.{dead}.123.tmp"
    orphan.write_bytes(b"partial")
    mine = folder / f"def.pth.{__import__('os').getpid()}.1.tmp"
    mine.write_bytes(b"in progress")
    embed_class_names(["cat"], encoder, templates="single", cache_dir=str(tmp_path))
    assert not orphan.exists() and mine.exists()
