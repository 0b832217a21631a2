"""purecomp.transforms: compression methods."""
