"""imsearch: text-to-image search with a dual encoder, FAISS and cross-attention rerankers."""
