"""Training callbacks: sample grids (and, as they are added, EMA weights and FID)."""
