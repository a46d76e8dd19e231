"""Training loops: the ranker (`ranker`) and the summarizer (`summarizer`)."""
