"""relsum: relevance-trained product summaries for cross-encoder search rankers."""

__version__ = "0.1.0"
