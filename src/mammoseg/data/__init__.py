"""Getting data in: CBIS-DDSM layouts, restructuring into manifests, the synthetic demo dataset."""
