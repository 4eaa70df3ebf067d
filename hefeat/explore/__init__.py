"""Latent-space exploration: faiss neighbours, UMAP, heatmaps, tile images, a local explorer page."""
