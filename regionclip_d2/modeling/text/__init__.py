from .embedding import embed_class_names, load_text_embeddings, weights_fingerprint
from .encoder import LanguageEncoder, build_language_encoder, build_tokenizer
from .templates import get_templates
