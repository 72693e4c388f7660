"""Step 4: sliding-window inference on full mammograms."""
