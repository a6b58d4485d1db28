"""Vectors: the catalogue's stored vectors, PCA, DBA, and the stores that search them (FAISS or Milvus)."""
