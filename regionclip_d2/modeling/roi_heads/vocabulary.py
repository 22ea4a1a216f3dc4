"""The open-vocabulary classifier and its vocabularies (docs/method.md, "Classifier").

A :class:`Vocabulary` is one set of classes: their text embeddings ``[C, D]`` (a buffer, so
it follows the model's device; never written to weight files), their names (or None), where
they came from (a tensor, a file, names), and whether they must be embedded (again). A
vocabulary given as names is embedded by the detector's language encoder on first use, and
again after new text-encoder weights are loaded.

:class:`TextEmbeddingClassifier` owns the training and the test vocabulary and scores region
embeddings against the active one: ``[cos(x, W_1) .. cos(x, W_C), cos(x, 0)] / T``, the
all-zero background embedding last. It is the box predictor's ``cls_score``.

A vocabulary may carry a per-class affine map of the cosines, ``cos * scale_c + bias_c`` before
the temperature (``logit_affine`` ``[C, 2]``; empty = the identity for every class). It is how
classes given by image exemplars are put on the text classes' scale
(:meth:`regionclip_d2.Detector.calibrate_exemplars`); the background column stays 0.
"""
import contextlib
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class NoVocabularyError(RuntimeError):
    pass


class Vocabulary(nn.Module):
    """One vocabulary: ``embeddings`` ``[C, D]``, ``names``, ``source`` and ``stale``.

    ``stale`` is True for a vocabulary given as names that has not been embedded with the
    current text encoder; :meth:`refresh` embeds it. Changes are made under one lock shared
    by all vocabularies (a lock attribute would make the module impossible to deepcopy or
    pickle; vocabulary changes are rare), so that threads sharing a model embed a vocabulary
    once and always see embeddings and names that belong together.
    """

    lock = threading.RLock()

    def __init__(self, embed_dim: int, name: str = "vocabulary"):
        super().__init__()
        self.embed_dim = embed_dim
        self.name = name  # "training vocabulary" / "test vocabulary", for messages
        self.register_buffer("embeddings", torch.zeros(0, embed_dim), persistent=False)
        self.register_buffer("logit_affine", torch.zeros(0, 2), persistent=False)  # empty: scale 1, bias 0
        self.names: Optional[List[str]] = None
        self.source = ""  # "" (unset) | "tensor" | "names" | a file path
        self.stale = False

    def __len__(self) -> int:
        """Number of classes (known from the names before they are embedded)."""
        if self.stale and self.names is not None:
            return len(self.names)
        return self.embeddings.shape[0]

    @property
    def from_names(self) -> bool:
        return self.source == "names"

    def _checked(self, emb: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(emb) or emb.dim() != 2:
            raise ValueError(f"{self.name}: class embeddings must be a [C, D] tensor")
        if emb.shape[0] == 0:
            raise ValueError(f"{self.name}: the vocabulary is empty")
        if emb.shape[1] != self.embed_dim:
            raise ValueError(
                f"{self.name}: text embeddings have dim {emb.shape[1]} but the backbone produces "
                f"{self.embed_dim}: set MODEL.CLIP.TEXT_EMB_DIM or use embeddings from the same CLIP model")
        return emb.detach().float().to(self.embeddings.device)

    def set(self, embeddings: torch.Tensor, names: Optional[Sequence[str]] = None, source: str = "tensor",
            logit_affine: Optional[torch.Tensor] = None):
        """Replace the embeddings and names together (``source``: where they came from;
        ``logit_affine``: ``[C, 2]`` per-class (scale, bias) of the cosines, or None)."""
        emb = self._checked(embeddings)
        if names is not None and len(names) != emb.shape[0]:
            raise ValueError(f"{self.name}: {len(names)} names given for {emb.shape[0]} embeddings")
        if logit_affine is None:
            affine = torch.zeros(0, 2, device=emb.device)
        else:
            affine = torch.as_tensor(logit_affine, dtype=torch.float32).detach().to(emb.device)
            if affine.shape != (emb.shape[0], 2) or not bool(torch.isfinite(affine).all()):
                raise ValueError(f"{self.name}: logit_affine must be a finite [C, 2] tensor of (scale, bias) per "
                                 f"class, C = {emb.shape[0]}; got shape {tuple(affine.shape)}")
        with self.lock:
            self.embeddings = emb
            self.logit_affine = affine
            self.names = list(names) if names is not None else None
            self.source = source
            self.stale = False

    def request(self, names: Sequence[str]):
        """Use these names; they are embedded by the next :meth:`refresh`."""
        if not names:
            raise ValueError(f"{self.name}: the vocabulary is empty")
        with self.lock:
            self.names = list(names)
            self.source = "names"
            self.stale = True

    def text_encoder_changed(self):
        """New text-encoder weights: a vocabulary given as names must be embedded again."""
        if self.from_names:
            self.stale = True

    @contextlib.contextmanager
    def replaced(self, embeddings: torch.Tensor, names: Optional[Sequence[str]] = None):
        """Within the block the vocabulary is ``embeddings`` (and ``names``); afterwards it is
        what it was, embeddings, names and state (e.g. a caption's phrases for one image)."""
        with self.lock:
            saved = (self.embeddings, self.logit_affine, self.names, self.source, self.stale)
            self.set(embeddings, names, source="tensor")
            try:
                yield self
            finally:
                self.embeddings, self.logit_affine, self.names, self.source, self.stale = saved

    def refresh(self, embed: Callable[[List[str]], torch.Tensor]):
        """Embed the names with ``embed`` (names -> ``[C, D]``) if the vocabulary is stale."""
        with self.lock:  # concurrent first calls: one thread embeds, the others wait for it
            if self.stale:
                self.set(embed(self.names), self.names, source="names")


class TextEmbeddingClassifier(nn.Module):
    """``[R, D]`` region embeddings -> ``[R, C+1]`` logits against the active vocabulary
    (the training vocabulary in training mode, or when no test vocabulary is set; else the
    test vocabulary), cosine similarities divided by ``temperature``, background last."""

    def __init__(self, embed_dim: int, temperature: float = 0.01):
        super().__init__()
        self.temperature = temperature
        self.train_vocabulary = Vocabulary(embed_dim, "training vocabulary")
        self.test_vocabulary = Vocabulary(embed_dim, "test vocabulary")

    def vocabularies(self) -> Tuple[Vocabulary, Vocabulary]:
        return self.train_vocabulary, self.test_vocabulary

    def active(self) -> Vocabulary:
        if self.training or len(self.test_vocabulary) == 0:
            return self.train_vocabulary
        return self.test_vocabulary

    def num_classes(self) -> int:
        return len(self.active())

    def embeddings(self) -> torch.Tensor:
        """The active ``[C, D]`` embeddings; a clear error when there are none (or they wait
        for the text encoder)."""
        return self.embeddings_and_affine()[0]

    def embeddings_and_affine(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The active ``[C, D]`` embeddings and their ``[C, 2]`` logit affine map (None when
        there is none), read together."""
        vocab = self.active()
        with vocab.lock:
            if vocab.stale:
                raise NoVocabularyError(f"the {vocab.name} ({len(vocab)} names) has not been embedded yet: "
                                        "call the detector (or its prepare_vocabulary()) rather than its "
                                        "box predictor directly")
            emb, affine = vocab.embeddings, vocab.logit_affine
        if emb.shape[0] == 0:
            raise NoVocabularyError(
                "the detector has no vocabulary: call model.set_vocabulary([...names...]) or set "
                "MODEL.CLIP.TEXT_EMB_PATH / MODEL.CLIP.VOCABULARY (and OPENSET_TEST_* for a test vocabulary)")
        return emb, (affine if affine.shape[0] else None)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        vocab, affine = self.embeddings_and_affine()
        with torch.autocast(emb.device.type, enabled=False):  # the classifier always runs in float32
            logits = F.normalize(emb.float(), dim=-1) @ F.normalize(vocab.float(), dim=-1).t()
            if affine is not None:
                logits = logits * affine[:, 0] + affine[:, 1]
        bg = torch.zeros(logits.shape[0], 1, dtype=logits.dtype, device=logits.device)  # cos(x, 0) := 0
        return torch.cat([logits, bg], dim=1) / self.temperature
