"""The sampler service: serves the student, generates completions, accepts new weights."""
