"""Bottom-layer helpers: atomic files and verified downloads (io), torch.distributed (distributed)."""
