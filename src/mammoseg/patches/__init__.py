"""Step 2 of the method: patch geometry, pre-processing shared with inference, HDF5 shards."""
