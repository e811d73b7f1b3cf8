"""The OpenAI response objects of a job: whole responses, stream chunks, logprobs."""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as _encode_string

from llamadist.generation.tokenizer import Tokenizer
from llamadist.generation.params import TokenLogprob
from llamadist.serve.openai_api import Choice, Job


def _piece(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok: Tokenizer, entries: list[TokenLogprob]) -> dict:
    def one(token_id: int, lp: float) -> dict:
        text = _piece(tok, token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [one(e.token_id, e.logprob) | {
        "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]}


def completion_logprobs(tok: Tokenizer, entries: list[TokenLogprob | None],
                        token_ids: list[int], offset: int = 0) -> dict:
    """The legacy completions shape; ``entries[i]`` None for a token without one (the
    prompt's first, with echo)."""
    tokens, lps, tops, offsets = [], [], [], []
    for token_id, e in zip(token_ids, entries):
        text = _piece(tok, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        lps.append(None if e is None else e.logprob)
        tops.append(None if e is None else {_piece(tok, t): lp for t, lp in e.top})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def generated(c: Choice) -> tuple[list[int], list[TokenLogprob]]:
    """The choice's output token ids (EOS dropped, as the engine does) and their
    logprobs."""
    req = c.stream.request if c.stream else None
    ids = list(req.output_ids) if req is not None else [o.token_id for o in c.outputs]
    lps = [o.logprobs for o in c.outputs if o.logprobs is not None][:len(ids)]
    return ids, lps


def whole_response(job: Job, tok: Tokenizer, model: str) -> dict:
    """The non-streaming response once every choice finished."""
    choices = []
    for c in sorted(job.choices, key=lambda c: c.index):
        ids, lps = generated(c)
        reason = c.finish_reason
        if job.kind == "chat":
            item = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(tok, lps) if job.num_logprobs is not None
                    else None, "finish_reason": reason}
        else:
            scored_only = job.body.max_tokens == 0  # echo + logprobs to score a text
            item = {"index": c.index, "text": "" if scored_only else c.text,
                    "logprobs": None, "finish_reason": "length" if scored_only else reason}
            if job.echo:
                item["text"] = tok.decode(c.prompt_ids) + item["text"]
            if job.num_logprobs is not None:
                item["logprobs"] = _completion_choice_logprobs(job, tok, c, ids, lps)
        choices.append(item)
    return {"id": job.object_id,
            "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": model, "choices": choices,
            "usage": job.usage()}


def _completion_choice_logprobs(job: Job, tok: Tokenizer, c: Choice, ids: list[int],
                                lps: list[TokenLogprob]) -> dict:
    if not job.echo:
        return completion_logprobs(tok, list(lps), ids)
    req = c.stream.request
    prompt = list(req.prompt_logprobs or [None] * len(c.prompt_ids))
    out_ids = ids if job.body.max_tokens != 0 else []
    out_lps = list(lps) if out_ids else []
    return completion_logprobs(tok, prompt + out_lps, c.prompt_ids + out_ids)


def chunk(job: Job, model: str, choice: dict) -> dict:
    return {"id": job.object_id,
            "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": model, "choices": [choice]}


def delta_choice(job: Job, tok: Tokenizer, c: Choice, text: str, lp: TokenLogprob | None,
                 finish_reason: str | None) -> dict:
    """One stream chunk's choice: the new text (and its token's logprobs when asked)."""
    if job.kind == "chat":
        item = {"index": c.index, "delta": {"content": text} if text or not finish_reason
                else {}, "logprobs": None, "finish_reason": finish_reason}
        if job.num_logprobs is not None and lp is not None:
            item["logprobs"] = chat_logprobs(tok, [lp])
        return item
    item = {"index": c.index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if job.num_logprobs is not None and lp is not None:
        item["logprobs"] = completion_logprobs(tok, [lp], [lp.token_id])
    return item


def usage_chunk(job: Job, model: str) -> dict:
    return {"id": job.object_id,
            "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": model, "choices": [], "usage": job.usage()}


_SLOT = "\x00slot\x00"  # a text no template holds elsewhere (checked: it must occur once)
_SLOT_JSON = json.dumps(_SLOT)


class TextEvents:
    """A streamed job's text events as SSE lines, from templates made once per choice:
    the ``data: {...}\\n\\n`` line that ``sse(chunk(job, model, delta_choice(...)))``
    writes for a chunk of text without logprobs and not finishing (all but the last of
    a stream's events), cut around its text, so each event costs the text's JSON string
    and a join instead of a dict and ``json.dumps`` of it (a few microseconds a token at
    hundreds of streams). ``None`` from ``event`` where the template does not apply:
    the caller builds that chunk as a dict."""

    def __init__(self, job: Job, model: str):
        self.job, self.model = job, model
        self._cut: dict[int, tuple[str, str] | None] = {}

    def _template(self, c: Choice) -> tuple[str, str] | None:
        line = "data: " + json.dumps(chunk(self.job, self.model, delta_choice(
            self.job, None, c, _SLOT, None, None))) + "\n\n"
        parts = line.split(_SLOT_JSON)
        return (parts[0], parts[1]) if len(parts) == 2 else None

    def event(self, c: Choice, text: str, lp: TokenLogprob | None,
              finish_reason: str | None) -> str | None:
        if finish_reason is not None or lp is not None:
            return None
        cut = self._cut.get(c.index, False)
        if cut is False:
            cut = self._cut[c.index] = self._template(c)
        if cut is None:
            return None
        return cut[0] + _encode_string(text) + cut[1]
