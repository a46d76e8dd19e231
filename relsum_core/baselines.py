"""Reference scorers a trained ranker must beat: BM25 and the untuned encoder's cosine.

Both score one query against that query's judged candidates only, as a reranker does; neither
sees labels.  BM25 statistics (idf, average length) therefore come from the candidate set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _stemmer():
    try:
        import Stemmer  # PyStemmer, optional: bm25s's recommended English stemmer
    except ImportError:
        return None
    return Stemmer.Stemmer("english")


def bm25_scores(query: str, docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 (bm25s, Lucene variant, English stop words, stemmed when PyStemmer is there)."""
    import bm25s

    if not docs:
        return np.zeros(0, dtype=np.float64)
    stemmer = _stemmer()
    kw = dict(stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    corpus = bm25s.tokenize(list(docs), **kw)
    q = bm25s.tokenize([query], **kw)[0]
    if not q or not any(corpus):  # nothing to match: every candidate ties
        return np.zeros(len(docs), dtype=np.float64)
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(corpus, show_progress=False)
    return np.asarray(retriever.get_scores(q), dtype=np.float64)


class CosineScorer:
    """Bi-encoder baseline: cosine of mean-pooled token embeddings of query and product text.

    Mean pooling over the attention mask is how all-MiniLM-L6-v2 was trained; it is loaded with
    plain ``transformers.AutoModel`` (no sentence-transformers), untuned.
    """

    def __init__(self, model, tokenizer, max_length: int = 256, device: str | torch.device = "cpu"):
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:  # its ids would index past the embeddings
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the encoder's "
                             f"vocabulary of {vocab}: not the encoder's own tokenizer")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        # never past the model's position table (a smaller encoder than MiniLM would index out of it)
        positions = getattr(model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, positions) if positions else max_length
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str, max_length: int = 256, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        from relsum_core.precision import HF_LOAD_LOCK

        try:
            with HF_LOAD_LOCK:
                model = AutoModel.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # a missing, truncated or corrupt checkpoint: name the folder
            raise ValueError(f"{path}: cannot load the encoder ({type(e).__name__}: {e})") from e
        return cls(model, tokenizer, max_length, device)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length embeddings, one row per text, in input order."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return np.concatenate(out).astype(np.float64)

    def scores(self, query: str, docs: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not docs:
            return np.zeros(0, dtype=np.float64)
        q = self.embed([query])[0]
        return self.embed(docs, batch_size) @ q
