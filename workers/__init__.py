"""Everything that runs a model: loading, corpora, SAEs, the harvest and its storage."""
