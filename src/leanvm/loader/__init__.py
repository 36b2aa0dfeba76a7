"""Guest image loaders: bare test programs now; bzImage, PVH and initrd later."""
