"""Pure-PyTorch references: the meaning of every geokern op (any device, float64 too).

One module per op family: geokern.reference.<family>."""
