"""Stage 2: models fitted from the store (one module per method family, plus shared pieces)."""
