"""GaussianTalker in farm: a user's trained audio-driven 3D Gaussian head model."""
