"""Limits the servers and the learner share; imports nothing, so the command line can use them."""

MAX_REQUEST_SEQUENCES = 4096
"""Both servers' default cap on the sequences of one request (`--max-request-sequences`; the
sampler counts prompts x n). The learner splits larger generate and grade calls into requests of
at most this many (`learner/rollout.py`), so a server started with a lower cap refuses them (413)."""

MAX_LOGPROBS_CAP = 1024
"""Largest top-k either schema admits; each server's --max-logprobs (default 20, vLLM's own
default) is the limit it enforces below that."""

MAX_N = 64
"""Most completions per prompt in one generate request; the learner's `sampling.n` and `eval.n`
are held to it at config time."""

MAX_TEMPERATURE = 2.0
"""Highest sampling temperature (vLLM's own limit, so both engines take the same requests)."""
