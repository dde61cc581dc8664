"""fgtutor: forward gradients vs backpropagation."""
