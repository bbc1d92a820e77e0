"""The `openai` backend: any OpenAI-compatible chat-completions endpoint (llama.cpp's server,
vLLM, Ollama, OpenRouter, OpenAI), with a limit on concurrent requests, retries with backoff
on 429 and 5xx, and the tokens each request used."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

Messages = list[dict[str, str]]
KEY_ENV = "FEATURESCOPE_LLM_API_KEY"
YES, NO = "yes", "no"


class EndpointError(RuntimeError):
    """The endpoint refused a request, or kept failing after the retries."""


class OpenAIChat:
    """Chat completions (and P(yes) from `top_logprobs`) from an OpenAI-compatible server."""

    def __init__(self, base_url: str, model: str | None, *, concurrency: int = 4,
                 retries: int = 5, backoff_s: float = 0.5, timeout_s: float = 120.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.name = model or "default"
        self.concurrency, self.retries, self.backoff_s = concurrency, retries, backoff_s
        key = os.environ.get(KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout_s, transport=transport)

    def _post(self, body: dict) -> dict:
        for attempt in range(self.retries + 1):
            try:
                r = self.client.post(self.url, json={"model": self.name, **body})
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise EndpointError(f"{self.url}: {exc}") from exc
            else:
                if r.status_code < 400:
                    return r.json()
                if r.status_code != 429 and r.status_code < 500 or attempt == self.retries:
                    raise EndpointError(f"{self.url} answered {r.status_code}: {r.text[:300]}")
            time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def _map(self, bodies: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._post, bodies))

    def chat(self, prompts: list[Messages], max_new_tokens: int = 24
             ) -> list[tuple[str, int | None]]:
        """Greedy completions, with the tokens each request used (None where not reported)."""
        answers = self._map([{"messages": m, "max_tokens": max_new_tokens, "temperature": 0}
                             for m in prompts])
        return [(a["choices"][0]["message"]["content"] or "",
                 (a.get("usage") or {}).get("total_tokens")) for a in answers]

    def p_yes(self, prompts: list[Messages]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) over the answer's first token, from its top_logprobs
        (spellings summed, case and surrounding space ignored); 0.5 where neither appears."""
        out = []
        for content in self._map_logprobs(prompts):
            p = {YES: 0.0, NO: 0.0}
            for alt in content[0].get("top_logprobs") or []:
                word = alt["token"].strip().lower()
                if word in p:
                    p[word] += math.exp(alt["logprob"])
            total = p[YES] + p[NO]
            out.append(p[YES] / total if total > 0 else 0.5)
        return out

    def _map_logprobs(self, prompts: list[Messages]) -> list[list]:
        """The `logprobs.content` of a one-token answer to each prompt."""
        answers = self._map([{"messages": m, "max_tokens": 1, "temperature": 0,
                              "logprobs": True, "top_logprobs": 20} for m in prompts])
        out = []
        for a in answers:
            content = (a["choices"][0].get("logprobs") or {}).get("content")
            if not content:
                raise EndpointError(f"{self.url} returned no logprobs: the detection and "
                                    f"fuzzing scorers need an endpoint that does")
            out.append(content)
        return out

    def require_logprobs(self) -> None:
        """Refuse at once (before anything is written) an endpoint that gives no logprobs."""
        self._map_logprobs([[{"role": "user", "content": "Answer yes or no: is 2 > 1?"}]])
