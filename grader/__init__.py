"""The grader service: serves the teacher and returns logprobs of given completion tokens."""
