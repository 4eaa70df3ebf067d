"""hefeat: H&E whole-slide images to a queryable feature store, and the models fitted from it.

Importing the package is cheap: torch, faiss, umap and openslide load only where they are used.
"""

__version__ = "0.1.0"

from hefeat.errors import HefeatError  # noqa: E402

__all__ = ["HefeatError", "__version__"]
