"""Pure data shared by every layer: requests, sampling parameters, outputs, errors."""
from tierlm.core.errors import (
    CorruptModelError,
    InvalidParameterError,
    ModelNotFoundError,
    PromptTooLongError,
    TierlmError,
    UnsupportedModelError,
)
from tierlm.core.outputs import CompletionOutput, Logprob, RequestOutput
from tierlm.core.request import Request, RequestStatus
from tierlm.core.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = [
    "CompletionOutput", "CorruptModelError", "InvalidParameterError", "Logprob", "ModelNotFoundError",
    "PromptTooLongError", "Request", "RequestOutput", "RequestStatus", "SamplingParams", "StructuredOutputsParams",
    "TierlmError",
    "UnsupportedModelError",
]
