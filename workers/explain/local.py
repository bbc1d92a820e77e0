"""The `local` backend: an instruct model run in-process with transformers (default: the
built-in SmolLM2-135M-Instruct), batched: one forward pass or generate call per batch of
prompts, never one per feature."""

from __future__ import annotations

from pathlib import Path

import torch

from app.config import DEFAULT_MODEL

Messages = list[dict[str, str]]
YES = ["yes", "Yes", " yes", " Yes"]
NO = ["no", "No", " no", " No"]


class LocalLM:
    """Chat completions and next-token log-probabilities from a local causal LM."""

    def __init__(self, spec: str | None = None, *, cache_dir: Path | None = None,
                 device: str = "cpu", batch_size: int = 8):
        from workers.loading import load_model

        lm = load_model(spec or DEFAULT_MODEL, device=device, cache_dir=cache_dir)
        self.name = lm.slug
        self.model, self.tok = lm.hf_model, lm.tokenizer
        if not getattr(self.tok, "chat_template", None):
            raise ValueError(f"model {self.name} has no chat template: an instruct model is "
                             f"needed to explain and score")
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self.batch_size = batch_size

    def _ids(self, messages: Messages, prefix: str = "") -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=True) + prefix
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask [batch, longest]."""
        n = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (n - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
        return ids.to(self.model.device), mask.to(self.model.device)

    def chat(self, prompts: list[Messages], max_new_tokens: int = 24) -> list[tuple[str, int]]:
        """Greedy completions of each prompt, with prompt + completion tokens used."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            seqs = [self._ids(m) for m in prompts[i:i + self.batch_size]]
            ids, mask = self._padded(seqs)
            with torch.inference_mode():
                gen = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                          max_new_tokens=max_new_tokens,
                                          pad_token_id=self.tok.pad_token_id)
            for s, row in zip(seqs, gen[:, ids.shape[1]:].tolist(), strict=True):
                if self.tok.eos_token_id in row:
                    row = row[:row.index(self.tok.eos_token_id)]
                out.append((self.tok.decode(row, skip_special_tokens=True).strip(),
                            len(s) + len(row)))
        return out

    def logprobs_at(self, seqs: list[list[int]], positions: list[list[int]],
                    candidates: list[int]) -> list[torch.Tensor]:
        """For each sequence, the log-probabilities of the `candidates` token ids as the next
        token after each of its `positions`: [len(positions), len(candidates)] per sequence."""
        out = []
        cand = torch.tensor(candidates, device=self.model.device)
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i:i + self.batch_size]
            ids, mask = self._padded(chunk)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            lp = logits.log_softmax(-1)
            n = ids.shape[1]
            for j, (s, pos) in enumerate(zip(chunk, positions[i:i + self.batch_size],
                                             strict=True)):
                at = torch.tensor(pos, device=lp.device) + (n - len(s))
                out.append(lp[j, at][:, cand].cpu())
        return out

    def next_token_logprobs(self, prompts: list[Messages], candidates: list[int]
                            ) -> list[torch.Tensor]:
        """The log-probabilities of `candidates` as the answer's first token: [n, len]."""
        seqs = [self._ids(m) for m in prompts]
        return [x[0] for x in self.logprobs_at(seqs, [[len(s) - 1] for s in seqs], candidates)]

    def token_ids(self, words: list[str]) -> list[int]:
        """The first token id of each word."""
        return [self.tok(w, add_special_tokens=False)["input_ids"][0] for w in words]

    def p_yes(self, prompts: list[Messages]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) for the answer's first token, each of yes and no summed
        over its spellings (YES, NO)."""
        ids = self.token_ids(YES + NO)
        lp = torch.stack(self.next_token_logprobs(prompts, ids))
        yes = lp[:, :len(YES)].logsumexp(-1)
        no = lp[:, len(YES):].logsumexp(-1)
        return torch.sigmoid(yes - no).tolist()
