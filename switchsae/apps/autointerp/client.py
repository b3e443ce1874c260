"""Chat requests to an OpenAI-compatible endpoint through the official ``openai`` client, with
retries and exponential backoff, safe to share between threads.

A request is retried when the endpoint cannot be reached, times out, answers 408/409/429/5xx,
or answers something that is not a chat completion (a body that is not JSON, JSON without
``choices[0].message.content``): attempt ``a`` (from 1) waits ``backoff · 2^(a-1)`` seconds (at most
30) before the next. Other refusals (400, 401, 403, 404, ...) are not retried. Either way the
failure becomes an :class:`EndpointError`, a one-line message naming the endpoint.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from switchsae.apps.autointerp.config import EndpointConfig
from switchsae.apps.autointerp.prompts import Messages

RETRIED_STATUS = {408, 409, 429}
MAX_WAIT_S = 30.0


class EndpointError(ConnectionError):
    """The LLM endpoint failed a request for good (after its retries, or refused it)."""


class MalformedReply(ValueError):
    """A response that is not a chat completion with a text message."""


@dataclass
class Reply:
    """A chat completion's text, the attempts it took and its seconds (all attempts)."""

    text: str
    attempts: int
    seconds: float


def reply_text(response: object) -> str:
    """The message text of a chat completion as the ``openai`` client returns it (a text body
    that was not JSON comes back as ``str``); :class:`MalformedReply` if it has none."""
    try:
        text = response.choices[0].message.content  # type: ignore[attr-defined]
    except (AttributeError, IndexError, KeyError, TypeError):
        text = None
    if not isinstance(text, str):
        shown = " ".join(str(response).split())[:120]
        raise MalformedReply(f"the response is not a chat completion with a message: {shown!r}")
    return text


class ChatClient:
    """Sends chat requests for :class:`EndpointConfig`'s endpoint and model (temperature 0)."""

    def __init__(self, cfg: EndpointConfig, endpoint: str, model: str):
        import openai

        self.cfg, self.endpoint, self.model = cfg, endpoint, model
        api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self._openai = openai
        self._client = openai.OpenAI(base_url=endpoint, api_key=api_key or "none", max_retries=0,
                                     timeout=cfg.timeout)

    def _retried(self, err: Exception) -> bool:
        o = self._openai
        if isinstance(err, o.APIStatusError):
            return err.status_code in RETRIED_STATUS or err.status_code >= 500
        return isinstance(err, (o.APIConnectionError, o.APIResponseValidationError, ValueError))

    def chat(self, messages: Messages, max_tokens: int) -> Reply:
        """The reply to ``messages`` (at most ``max_tokens`` tokens); :class:`EndpointError` once the
        attempts are spent or the endpoint refuses the request."""
        start = time.perf_counter()
        for attempt in range(1, self.cfg.retries + 1):
            try:
                response = self._client.chat.completions.create(model=self.model, messages=messages,  # type: ignore[arg-type]
                                                                max_tokens=max_tokens, temperature=0.0)
                return Reply(reply_text(response), attempt, time.perf_counter() - start)
            except Exception as err:  # sorted into retried / refused below; anything else is a bug
                if not isinstance(err, (self._openai.OpenAIError, ValueError)):
                    raise
                detail = " ".join(str(err).split())[:200] or type(err).__name__
                if not self._retried(err):
                    raise EndpointError(f"the LLM endpoint {self.endpoint} refused a request: {detail}") from None
                if attempt == self.cfg.retries:
                    raise EndpointError(f"the LLM endpoint {self.endpoint} failed {attempt} attempts of a request "
                                        f"(the last: {type(err).__name__}: {detail})") from None
                time.sleep(min(self.cfg.backoff * 2 ** (attempt - 1), MAX_WAIT_S))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._client.close()
