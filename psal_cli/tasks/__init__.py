"""Task-specific training and evaluation (one module per task), reusing the networks and training.fit."""
