"""Step 3: the U-Net, its losses and metrics, the training input pipeline and training."""
