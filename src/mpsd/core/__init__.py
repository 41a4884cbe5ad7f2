"""The numpy kernel of mpsd: layouts, batched TT-SVD, contraction, spectra, quantisation.

Nothing in this package does I/O; every function works on whole batches of images.
"""
