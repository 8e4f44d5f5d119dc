"""One exception hierarchy for the whole project.

Categories also subclass the matching stdlib type so callers can catch either. Every class takes
only a message (plus plain-data extras) so it stays picklable across processes.
"""


class OpdError(Exception):
    """Base of every error opd raises on purpose."""


class ConfigError(OpdError, ValueError):
    """A config file or flag is malformed; the message names the key."""


class TokenizerMismatchError(OpdError, ValueError):
    """Student and teacher tokenizers differ; the message carries both fingerprints."""


class ServiceError(OpdError, RuntimeError):
    """A sampler or grader answered with an error or could not be reached."""

    service = "service"

    def __init__(
        self, message: str, status: int | None = None, error_type: str | None = None, unreachable: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        """The `type` of the server's error envelope (e.g. `non_finite_output`), when it sent one."""
        self.unreachable = unreachable
        """No answer came (refused, cut off, timed out) after the client's own retries: another
        replica may still answer."""

    def __reduce__(self) -> tuple:
        return (type(self), (self.args[0], self.status, self.error_type, self.unreachable))


class SamplerError(ServiceError):
    service = "sampler"


class StaleSamplerError(SamplerError):
    """The sampler answered with other weights than the learner's (a restarted sampler serves its
    initial weights as version 0); the learner pushes its weights again and asks again."""


class GraderError(ServiceError):
    service = "grader"


class RequestError(OpdError, ValueError):
    """Bad input to a server; becomes an HTTP 4xx naming the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status

    def __reduce__(self) -> tuple:
        return (type(self), (self.args[0], self.param, self.status))


class NonFiniteOutputError(OpdError, RuntimeError):
    """The served model produced NaN or infinite logprobs (finite but absurd weights overflow);
    answered as a 500 that says so, never handed out as a result."""


class EngineDeadError(OpdError, RuntimeError):
    """The inference engine behind a server died; the server answers 503 and exits so that a
    supervisor (compose, the learner's health wait) restarts it."""
