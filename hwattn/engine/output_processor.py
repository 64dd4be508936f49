"""The engine's output side: sampled tokens into their sequences, sequences into outputs.

`OutputProcessor` owns what happens to a token once the engine has it on the host (in the
spirit of vLLM's output processor and detokenizer): appending it to its sequence with the stop
conditions (end of sequence, stop token ids, `max_tokens`, the context), detokenization (one
incremental detokenizer per live sequence) and stop strings, output and prompt
log-probabilities, finishing a request alone with finish_reason "error", and each step's
`RequestOutput`s, freeing the sequences that finished (and the siblings of a failed one).
`LLMEngine` keeps request intake, scheduling, launching, speculation and the cache
bookkeeping, and calls in here.
"""

from __future__ import annotations

import time

from hwattn.data.tokenizer import IncrementalDetokenizer, StreamDetokenizer, incremental_detokenizer
from hwattn.engine.model_runner import Sampled
from hwattn.engine.sampler import describe_error
from hwattn.engine.scheduler import Scheduler
from hwattn.engine.sequence import Logprob, RequestOutput, Sequence


class OutputProcessor:
    """The output side of one `LLMEngine`.

    tokenizer: the engine's (eos_token_id, decode, and what the detokenizers read).
    max_model_len: the engine's context; an output stops by length at it.
    scheduler: frees the sequences that finish.
    requests: the engine's request id -> its n sequences; a request leaves it once its
        finished output is built.
    counters: the engine's; this side counts generation_tokens, finished and failed.
    """

    def __init__(self, tokenizer, max_model_len: int, scheduler: Scheduler,
                 requests: dict[str, list[Sequence]], counters: dict[str, int]):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.scheduler = scheduler
        self.requests = requests
        self.counters = counters
        self.detok: dict[Sequence, IncrementalDetokenizer | StreamDetokenizer] = {}
        self.failed: list[Sequence] = []  # requests failed alone during the current step

    def add(self, seq: Sequence) -> None:
        """Set up a queued sequence's detokenizer (whatever that raises is raised)."""
        self.detok[seq] = incremental_detokenizer(self.tokenizer, seq.params.skip_special_tokens)

    def drop(self, seq: Sequence) -> None:
        """Forget a sequence that leaves the engine otherwise (aborted, or its batch refused)."""
        self.detok.pop(seq, None)

    def begin_step(self) -> None:
        self.failed = []

    def outputs(self, touched: list[Sequence]) -> list[RequestOutput]:
        """Free the finished among the sequences a step advanced (and the failed ones);
        one output per request that advanced, of its `output_kind` (`Sequence.output`; if
        "final_only": only once all its sequences have finished)."""
        if self.failed:
            touched += [s for s in self.failed if s not in touched]
        live, detok, finish = self.requests, self.detok, self.scheduler.finish
        requests: dict[str, list[Sequence]] = {}
        for seq in touched:
            group = live.get(seq.request_id)
            if group is None:
                continue
            requests[seq.request_id] = group
            if seq.finish_reason is not None:
                detok.pop(seq, None)
                finish(seq)
                if seq.finish_reason == "error":  # the request fails: its siblings stop too
                    for sibling in group:
                        if sibling.finish_reason is None:
                            sibling.finish_reason, sibling.finish_time = "abort", seq.finish_time
                            detok.pop(sibling, None)
                            finish(sibling)
        # Built once per request and step (with output_kind "delta" or "cumulative"), so the
        # request's finish is read off its sequences, as `RequestOutput.finished` would read
        # it off the output's completions.
        outputs = []
        for rid, group in requests.items():
            first = group[0]
            finished = first.finish_reason is not None if len(group) == 1 else \
                all(s.finish_reason is not None for s in group)
            if not finished and first.params.output_kind == "final_only":
                continue
            out = first.output(group)
            outputs.append(out)
            if finished:
                del live[rid]
                self.counters["failed" if out.error is not None else "finished"] += 1
        return outputs

    def fail(self, seq: Sequence, err: Exception | str) -> None:
        """Finish `seq` alone with an error (an exception, or its description from a worker);
        `outputs` frees it with the finished ones."""
        seq.finish_reason = "error"
        seq.error = err if isinstance(err, str) else describe_error(err)
        seq.finish_time = time.perf_counter()
        self.failed.append(seq)

    def append_or_fail(self, seq: Sequence, tokens: list) -> int | None:
        """`_append`, or None after failing the request if detokenizing or stop handling raised.
        tokens: ids, or the runner's `Sampled` (id and log-probabilities)."""
        try:
            return self._append(seq, tokens)
        except Exception as err:  # noqa: BLE001 - that request alone fails
            self.fail(seq, err)
            return None

    def _append(self, seq: Sequence, tokens: list) -> int:
        """Append sampled tokens until a stop condition; returns how many were kept."""
        params = seq.params
        eos = getattr(self.tokenizer, "eos_token_id", None)
        stops_at_eos = eos is not None and not params.ignore_eos
        ids = seq.token_ids
        # Per token: its output count (the min_tokens and max_tokens checks) and the
        # sequence's length once it is appended (the context check).
        num_out = len(ids) - seq.num_prompt_tokens
        room = self.max_model_len - len(ids)
        min_tokens, max_tokens = params.min_tokens, params.max_tokens
        stop_ids = params.stop_token_ids
        kept = 0
        now = time.perf_counter()
        if seq.first_token_time is None:
            seq.first_token_time = now
        try:
            for token in tokens:
                if isinstance(token, Sampled):
                    token, logprobs = token
                    self._record_logprobs(seq, token, logprobs)
                ids.append(token)
                kept += 1
                may_stop = num_out + kept > min_tokens
                if may_stop and stops_at_eos and token == eos:
                    seq.finish_reason = "stop"
                elif may_stop and token in stop_ids:
                    seq.finish_reason, seq.stop_reason = "stop", token
                elif num_out + kept >= max_tokens or kept >= room:
                    seq.finish_reason = "length"
                if params.detokenize:
                    # The token that ended the output (end-of-sequence or a stop token id) is
                    # kept in token_ids but left out of the text unless
                    # include_stop_str_in_output, as vLLM's detokenizer leaves it out.
                    shown = len(ids) - (seq.finish_reason == "stop"
                                        and not params.include_stop_str_in_output)
                    delta = self.detok[seq].step(ids, seq.num_prompt_tokens, shown)
                    if delta:
                        seq.text += delta
                        if params.stop and may_stop and self._hit_stop(seq, len(delta)):
                            seq.finish_reason = "stop"
                if seq.finish_reason is not None:
                    seq.finish_time = now
                    break
        finally:
            self.counters["generation_tokens"] += kept
        return kept

    def _decoded(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _position(self, token: int, entry) -> dict:
        """A `PositionLogprobs` from the runner's (logprob, rank, top ids, top logprobs)."""
        logprob, rank, top_ids, top_values = entry
        out = {t: Logprob(v, r + 1, self._decoded(t))
               for r, (t, v) in enumerate(zip(top_ids, top_values))}
        if token not in out:
            out = {token: Logprob(logprob, rank, self._decoded(token)), **out}
        return out

    def _record_logprobs(self, seq: Sequence, token: int, entry) -> None:
        seq.logprobs.append(self._position(token, entry))
        seq.cumulative_logprob += entry[0]

    def record_prompt_logprobs(self, seq: Sequence, entries) -> None:
        """Store a prefill chunk's prompt log-probabilities, or fail the request with the
        runner's error (a str)."""
        if isinstance(entries, str):
            self.fail(seq, entries)
            return
        try:
            for offset, entry in enumerate(entries):
                position = seq.num_cached + 1 + offset
                seq.prompt_logprobs[position] = self._position(seq.token_ids[position], entry)
        except Exception as err:  # noqa: BLE001 - that request alone fails
            self.fail(seq, err)

    @staticmethod
    def _hit_stop(seq: Sequence, delta_len: int) -> bool:
        # Each stop string only where it may end in the new text (as vLLM looks): one seen
        # earlier, while min_tokens held stops off, does not end the output now.
        end = len(seq.text) - delta_len + 1
        found = [(i, s) for i, s in ((seq.text.find(s, max(0, end - len(s))), s)
                                     for s in seq.params.stop) if i >= 0]
        if not found:
            return False
        at, stop = min(found)
        seq.text = seq.text[:at + len(stop) if seq.params.include_stop_str_in_output else at]
        seq.stop_reason = stop
        return True

    def check(self, live: int) -> None:
        """Raise if more detokenizers are held than `live` sequences."""
        if len(self.detok) > live:
            raise RuntimeError(f"{len(self.detok)} detokenizers for {live} live sequences")
