"""Typed errors. Each names the problem and the fix in one line; the CLI prints it and exits 2."""


class TierlmError(Exception):
    """Base of every user-facing error. `str(err)` is one line: problem, then fix."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} ({fix})" if fix else problem)


class InvalidParameterError(TierlmError, ValueError):
    """A sampling or engine parameter is out of range."""

    def __init__(self, problem: str, fix: str | None = None, param: str | None = None):
        self.param = param
        super().__init__(problem, fix)


class PromptTooLongError(InvalidParameterError):
    """The prompt (plus max_tokens, when given) does not fit the engine's context.

    `why` says what set the limit when it is less than the model's own context (e.g. the KV pool)."""

    def __init__(self, num_tokens: int, max_model_len: int, max_tokens: int | None = None, why: str = ""):
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens
        limit = f"This model's maximum context length is {max_model_len} tokens{f' ({why})' if why else ''}"
        if max_tokens is None:
            asked = f"but the prompt has {num_tokens} tokens"
        else:
            asked = (f"but {num_tokens + max_tokens} tokens were requested ({num_tokens} in the prompt, "
                     f"{max_tokens} in max_tokens)")
        super().__init__(f"{limit}, {asked}", "shorten the prompt or lower max_tokens", param="prompt")


class ModelNotFoundError(TierlmError, FileNotFoundError):
    """The model path or name does not exist."""


class CorruptModelError(TierlmError):
    """A model file is truncated, corrupt or inconsistent."""


class UnsupportedModelError(TierlmError):
    """The architecture or tensor type is not supported."""
