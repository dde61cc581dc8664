"""fgtutor: forward gradients vs backpropagation."""

__version__ = "0.1.0"
