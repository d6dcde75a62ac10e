"""pytest-modal-vllm: run pytest suites against open models served by vLLM on Modal.

`pytest --vllm-platform=NAME` wakes the platform's endpoint before collection, keeps it warm
while tests run and hands tests ready clients (`openai_client`, `chat_model`, ...).
"""

from __future__ import annotations

from .current import EndpointLookupError, current_endpoint
from .endpoint import Endpoint

__all__ = ["Endpoint", "EndpointLookupError", "__version__", "current_endpoint"]
__version__ = "0.1.0"
