"""Files and images: atomic writes, output checks, loading and fitting images, masks as pictures."""
