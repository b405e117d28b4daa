"""MAVI wire formats and clients."""
