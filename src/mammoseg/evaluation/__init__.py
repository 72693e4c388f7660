"""Step 5: pixel and lesion metrics, FROC, overlays and summary tables."""
