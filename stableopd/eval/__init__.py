"""Answer checking and evaluation presets."""
