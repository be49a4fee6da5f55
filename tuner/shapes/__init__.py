"""The shipped small text-to-image model of the procedural shapes domain, and its data."""
