"""timm baselines sized for 32×32 inputs (placeholder registrations are added by the training work)."""
