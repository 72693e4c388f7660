"""mammoseg: mass segmentation in mammograms after Marita et al. (CBIS-DDSM, U-Net).

The package holds the science; the Snakemake workflow in ``workflow/`` only calls it.
Modules never import Snakemake, and ``metrics``/``restructure``/``dicom`` never import TensorFlow.
"""

__version__ = "0.1.0"
