"""Reading and writing files: DICOM and raster mammograms and masks, atomic writes."""
