"""opd: on-policy distillation over HTTP.

Shared pieces of the three processes: errors, tokenizer fingerprints, model loading, tiny models
for tests and the demo, the HTTP error envelope, and the `opd` command line. The services live in
`sampler/` and `grader/`, the training loop in `learner/`.
"""

__version__ = "0.1.0"
