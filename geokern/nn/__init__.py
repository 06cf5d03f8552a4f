"""Drop-in nn.Modules built on geokern ops."""
