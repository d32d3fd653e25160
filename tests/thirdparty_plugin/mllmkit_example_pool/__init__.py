"""An example third-party plugin: a bridge that average-pools vision tokens."""
