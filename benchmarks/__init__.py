"""sdrt against diffusers, side by side."""
