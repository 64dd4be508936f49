"""The engine loop: requests in, one scheduled step at a time, outputs back.

`LLMEngine` ties the parts together: `Scheduler` (who runs: policy), `BlockManager` (pages:
mechanism), `ModelRunner` (the model over the paged cache), the sampler and an optional
speculative drafter. Each `step()` runs one step (decodes and prompt chunks together, or, when
speculating, a prefill or a verify step), samples on the device, reads the new tokens back
once, and updates the sequences: cache bookkeeping (including rolling back rejected draft
slots) here, and through its `OutputProcessor` (`hwattn/engine/output_processor.py`) the
output side: stop conditions, detokenized text, log-probabilities and the step's outputs.

Overlapped scheduling (plain decoding on one process): `step()` launches step N, whose decode
rows take their input tokens straight from step N-1's sampled tokens on the device, and only
then reads back and processes step N-1's tokens, so the host's scheduling, bookkeeping and
detokenization run while the device computes. Until read back, a sampled token is a
placeholder in `Sequence.token_ids` (`Sequence.num_pending`); a sequence that turns out to have
stopped at step N-1 has its row of step N dropped, and one that ends by length is not
scheduled past its end. Outputs therefore trail their step by one `step()` call.

A speculative engine's verify steps are not overlapped: their drafts are made from the tokens
themselves, so the step in flight is read back before one is prepared. Its other steps
(prefill, and plain decode steps: a batch of `speculative_disable_batch_size` sequences or
more, a sequence at the end of its context, a request that needs penalties or log-probs) are
launched as above, so the engine may go from overlapped steps to verify steps and back at
any step.

Nothing one request carries can stop another: requests are validated (all or none) before they
are queued (`hwattn/engine/requests.py`), and a request whose sampling or detokenization still fails inside a step is
finished alone with finish_reason "error". Sampling runs in the runner (in this process or on
tensor-parallel rank 0), which samples a failing batch row by row and reports the failing
row's error in place of its token, so that a bad row never fails the step.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field

import torch

from hwattn.engine.block_manager import BlockManager
from hwattn.engine.config import EngineConfig
from hwattn.engine.launch import LaunchThread, PendingTokens
from hwattn.engine.model_runner import StepInput
from hwattn.engine.output_processor import OutputProcessor
from hwattn.engine.requests import (check_owner, check_request_ids, check_requests,
                                    checked_params, fresh_request_ids, sibling_seed,
                                    validate_prompt)
from hwattn.engine.sampler import SamplingInput, verify_bans
from hwattn.engine.sampling_params import SamplingParams
from hwattn.engine.scheduler import Scheduler
from hwattn.engine.sequence import DeltaJoiner, RequestOutput, Sequence
from hwattn.engine.speculative import Drafter
from hwattn.engine.step_timer import StepTimer

PLACEHOLDER = -1  # token id standing for a sampled token not read back yet


@dataclass
class InFlight:
    """A launched step: its tokens on their way back, and per sampled row the sequence and
    the index of its placeholder in `token_ids`."""

    tokens: PendingTokens
    rows: list[tuple[Sequence, int]]
    row_of: dict = field(default_factory=dict)  # sequence -> its row in the sampled tokens
    deferred: bool = True  # read back during the next step (else at once: sampled on the host's terms)


class LLMEngine:
    """Continuous-batching engine over one model, in this process or sharded over
    tensor-parallel worker processes.

    runner: runs the model and samples: `sample_step`, `verify_step`, `device` (a
        `ModelRunner`, or a `TensorParallelExecutor` driving worker processes).
    config: how the engine was assembled (`EngineConfig`); its sizes are read here.
    drafter: a speculative `Drafter` or None.
    model: the served `Transformer` when it lives in this process (None under tensor
        parallelism: the weights live in the workers). dtype: the weights' dtype.
    """

    def __init__(self, runner, tokenizer, model_config, config: EngineConfig, num_pages: int,
                 drafter: Drafter | None = None, kv_bytes_per_token: int | None = None,
                 model=None, dtype: torch.dtype | None = None):
        self.runner = runner
        self.model = model
        self.dtype = dtype
        self.tensor_parallel_size = config.tensor_parallel_size
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.config = config
        self.max_model_len = config.max_model_len or model_config.max_seq_len
        self.block_manager = BlockManager(num_pages, config.page_size, config.enable_prefix_caching)
        self.drafter = drafter
        self.k = config.num_speculative_tokens if drafter is not None else 0
        # Steps starting with this many running sequences or more decode plainly.
        self.disable_batch_size = config.speculative_disable_batch_size if self.k else None
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len,
                                   mixed=config.enable_mixed_batches and not self.k)
        # Verify steps run in step with the host whatever this says; it is about the others.
        self.overlap = config.overlap_scheduling and hasattr(runner, "launch_step")
        self._inflight: InFlight | None = None
        self.kv_bytes_per_token = kv_bytes_per_token
        self.device = runner.device
        self.requests: dict[str, list[Sequence]] = {}  # request id -> its n sequences
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self.counters = dict(prompt_tokens=0, generation_tokens=0, steps=0, prefill_steps=0,
                             decode_steps=0, mixed_steps=0, draft_tokens=0, accepted_tokens=0,
                             finished=0, aborted=0, failed=0)
        # The output side: tokens into sequences (stops, text, log-probs), outputs, failures.
        self.output_processor = OutputProcessor(tokenizer, self.max_model_len, self.scheduler,
                                                self.requests, self.counters)
        # Outputs of a step that raised after reading tokens back: the next `step` returns them.
        self._unreported: list[RequestOutput] = []
        self.step_timer = StepTimer()  # host seconds per phase of each step
        # Overlapped launches made from a thread of their own (`LaunchThread`): their parts
        # are then not timed (the thread's time falls across the engine's steps).
        self.launcher = LaunchThread(runner) if self.overlap and config.launch_thread else None
        if hasattr(runner, "step_timer") and self.launcher is None:
            runner.step_timer = self.step_timer  # a local runner times its launches' parts

    # Requests.
    def add_request(self, prompt: str | list[int] | torch.Tensor,
                    params: SamplingParams | None = None, request_id: str | None = None,
                    owner: str | None = None) -> str:
        """Queue a request (text, token ids or a 1-D integer tensor of ids); returns its id.
        owner: whom the scheduler shares the batch fairly between (default: the request id;
        requests of one owner take turns together against other owners' requests).
        Raises ValueError if the prompt is empty, has ids outside the vocabulary or does not
        fit the context, if `params` is not a valid `SamplingParams`, or if `request_id` is in use
        (from here until its final output has come out of `step`, or it was aborted) or, like
        `owner`, is not hashable."""
        return self.add_requests([prompt], [params], [request_id], owner=owner)[0]

    def add_requests(self, prompts: list, params: list[SamplingParams | None],
                     request_ids: list[str | None] | None = None,
                     owner: str | None = None) -> list[str]:
        """Queue several requests, all or none: every prompt and every params is checked
        before any request is queued, so a ValueError (naming the bad prompt's index) leaves
        the engine as it was; so does any error raised while they are queued (settings that
        cannot be read, a detokenizer that cannot be set up), which is raised as it is.
        owner: as for `add_request`, shared by all of them."""
        check_owner(owner)
        checked = check_requests(prompts, params, self.validate_prompt, self.check_params,
                                 self.max_model_len)
        request_ids = list(request_ids) if request_ids is not None else [None] * len(prompts)
        # An id is in use until its final output has come out of `step` (one held back after
        # a failed step, `_unreported`, too), as in `DataParallelEngine`.
        in_use = self.requests.keys() | {o.request_id for o in self._unreported}
        rids = fresh_request_ids(request_ids, self._ids, in_use)
        check_request_ids(rids, in_use, len(prompts))
        rng, queued = self._rng.getstate(), []
        try:
            for prompt, rid, (ids, sp) in zip(prompts, rids, checked):
                seed = sp.seed if sp.seed is not None else self._rng.getrandbits(63)
                text = prompt if isinstance(prompt, str) else None
                # n completions: n sequences sharing the prompt, each with its own seed.
                group = [Sequence(rid, ids, sp, sibling_seed(seed, i), prompt=text, index=i,
                                  owner=owner) for i in range(sp.n)]
                self.requests[rid] = group
                queued.append(rid)
                for seq in group:
                    self.output_processor.add(seq)
                    self.scheduler.add(seq)
        except BaseException:
            for rid in queued:  # nothing of the batch stays
                for seq in self.requests.pop(rid):
                    self.output_processor.drop(seq)
                    self.scheduler.finish(seq)
            self._rng.setstate(rng)  # no seed drawn for a batch refused
            raise
        return rids

    def check_params(self, params: SamplingParams | None) -> SamplingParams:
        """What `add_request` checks of `params` (`validate_prompt` checks the prompt), without
        queueing anything: a checked copy, or the ValueError `add_request` would raise. Safe to
        call from another thread (the server checks a request before it starts streaming the
        answer)."""
        return checked_params(params, self.model_config.vocab_size, self.tokenizer,
                              self.max_model_len)

    def validate_prompt(self, prompt: str | list[int] | torch.Tensor,
                        truncate_prompt_tokens: int | None = None) -> list[int]:
        """`validate_prompt` against this engine's tokenizer, vocabulary and context (keeping
        the last `truncate_prompt_tokens`, as `SamplingParams` says). Safe to call from another
        thread."""
        return validate_prompt(prompt, self.tokenizer, self.model_config.vocab_size,
                               self.max_model_len, truncate_prompt_tokens)

    def abort_request(self, request_id: str | list[str]
                      ) -> RequestOutput | None | list[RequestOutput | None]:
        """Stop a request (all its n sequences) and free its pages; None if it is unknown or
        already done. A list of ids (vLLM's `abort_request(request_ids)`; a list is never an
        id) stops each of them and returns their results in a list. An output held back
        after a failed step is dropped (the final one too); a "delta" request's abort output
        then holds what the dropped ones held, so nothing it generated is lost."""
        if isinstance(request_id, list):
            return [self.abort_request(r) for r in request_id]
        held = [o for o in self._unreported if o.request_id == request_id]
        self._unreported = [o for o in self._unreported if o.request_id != request_id]
        group = self.requests.pop(request_id, None)
        if group is None:
            return None
        now = time.perf_counter()
        for seq in group:
            self.output_processor.drop(seq)
            if seq.num_pending:  # placeholders of tokens still on the device
                del seq.token_ids[len(seq.token_ids) - seq.num_pending:]
                seq.num_pending = 0
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                seq.finish_time = now
            self.scheduler.finish(seq)
        self.counters["aborted"] += 1
        out = group[0].output(group)
        if held and group[0].params.output_kind == "delta":  # marked reported when built
            joiner = DeltaJoiner()
            for o in (*held, out):
                joiner.add(o)
            out = joiner.take()
        return out

    @property
    def detok(self) -> dict:
        """Each live sequence's detokenizer (`OutputProcessor.detok`)."""
        return self.output_processor.detok

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._unreported)

    def unfinished_request_ids(self) -> list[str]:
        return list(self.requests)

    # One step.
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of requests that advanced (with overlapped
        scheduling: those the previous step advanced, read back while this one runs).

        A request whose sampling, detokenization or stop handling raises is finished alone
        with finish_reason "error" (its output's `error` says why); the rest of the batch
        goes on. Only a failure of the step itself (the model, the scheduler) raises; the
        outputs of what it had read back before (requests it finished, their pages freed)
        are then what the next call returns, without running a step."""
        if self._unreported:
            outputs, self._unreported = self._unreported, []
            return outputs
        k = self._lookahead()
        self.output_processor.begin_step()
        touched, launched = [], None
        timer = self.step_timer
        timer.begin_step()
        if self._inflight is not None and (k or self._needs_host(
                [*self.scheduler.running, *self.scheduler.waiting])):
            # The next step drafts from the tokens (a verify step) or is sampled on the host's
            # terms: read the one in flight back first, so that no step of it reads a
            # placeholder.
            previous, self._inflight = self._inflight, None
            touched = self._resolve(previous)
            with timer.phase("resolve"):
                for seq in touched:
                    if seq.finish_reason is not None:
                        self.scheduler.finish(seq)
        try:
            with timer.phase("schedule"):
                batch = self.scheduler.schedule(lookahead=k)
            if batch is not None and batch.seqs:
                self.counters["steps"] += 1
                if batch.kind == "decode" and k:
                    # Times its own launch (which waits for the results) and resolve.
                    touched += self._speculative_decode(batch.seqs, k)
                else:
                    with timer.phase("launch"):
                        launched = self._launch(batch)
            previous, self._inflight = self._inflight, None
            if previous is not None:
                touched += self._resolve(previous)
            if launched is not None:
                if launched.deferred:
                    self._inflight = launched
                else:
                    touched += self._resolve(launched)
        except BaseException:
            if touched or self.output_processor.failed:
                # Read back (and freed) already: report them next call.
                self._unreported = self.output_processor.outputs(touched)
            raise
        with timer.phase("output"):
            outputs = self.output_processor.outputs(touched)
        timer.end_step()
        return outputs

    def _lookahead(self) -> int:
        """The drafts a decode step verifies this step: k, or 0 for a plain decode step. Decided
        as the step starts, from the sequences running then (one whose token of the step in
        flight ends it still counts, for this one step)."""
        k, running = self.k, self.scheduler.running
        if not k:
            return 0
        if self.disable_batch_size is not None and len(running) >= self.disable_batch_size:
            # A batch this large takes plain steps, whose host work overlaps the device's
            # (a verify step's cannot): the user's threshold, not one the engine measures.
            return 0
        on_host = self.drafter.deterministic  # n-gram drafts: their bad-word bans are known
        if any(len(s) + k > self.max_model_len or not s.params.plain
               or (not on_host and s.params.bad_words) for s in running):
            # Someone is at the end of the context, or needs penalties, bans or log-probs
            # (drafts are verified for plain sampling only; bad words with drafts made on the
            # host only): plain decoding this step.
            return 0
        return k

    def _sampling(self, seqs: list[Sequence]) -> tuple[SamplingInput | None, list[Sequence]]:
        """The sampling settings of those of `seqs` whose settings can be read, and those
        sequences; any other fails alone here."""
        if all(s.argmax_only for s in seqs):  # the common case, which cannot raise
            return SamplingInput.argmax_rows([s.params for s in seqs], [s.seed for s in seqs],
                                             [len(s.token_ids) for s in seqs]), seqs
        eos = getattr(self.tokenizer, "eos_token_id", None)

        def build(rows):
            params = [s.params for s in rows]
            history = any(p.penalized or p.min_tokens or p.bad_words for p in params)
            return SamplingInput.of(params, [s.seed for s in rows], [len(s) for s in rows],
                                    [(s.token_ids, s.num_prompt_tokens) for s in rows]
                                    if history else None, eos)

        try:
            return build(seqs), seqs
        except Exception:  # noqa: BLE001 - find the rows that fail on their own
            pass
        ok = []
        for seq in seqs:
            try:
                build([seq])
                ok.append(seq)
            except Exception as err:  # noqa: BLE001 - that request alone fails
                self.output_processor.fail(seq, err)
        return (build(ok) if ok else None), ok

    def _launch(self, batch) -> InFlight | None:
        """Start a step of decode rows (one token each, the first `batch.num_decode`) and
        prompt chunks; returns it in flight. Each row that samples gets a placeholder token,
        and the cache counts advance as if the step were done."""
        nd = batch.num_decode
        decodes = batch.seqs[:nd]
        prefills = list(zip(batch.seqs[nd:], batch.chunks[nd:]))
        last = [s for s, n in prefills if s.num_cached + n == len(s)]
        sampling, sampled = self._sampling(decodes + last) if decodes or last else (None, [])
        ok = {id(s) for s in sampled}
        # A decode row whose settings failed leaves the step; a prompt row whose settings
        # failed still writes its prompt (its pages stay consistent for the prefix cache).
        decodes = [s for s in decodes if id(s) in ok]
        if not decodes and not prefills:
            return None
        source = self._inflight.row_of if self._inflight is not None else {}
        feed = []
        for seq in decodes:
            if seq.num_pending and id(seq) not in source:
                raise RuntimeError(f"request {seq.request_id} waits on a token no step in "
                                   "flight sampled")
            feed.append(source[id(seq)] if seq.num_pending else -1)
        kind = "mixed" if decodes and prefills else ("decode" if decodes else "prefill")
        deferred = self.overlap and not self._needs_host(batch.seqs)
        # The runner reads the page lists before this returns, unless the launch thread takes
        # the step later, when the next schedule may already have grown them: copies then.
        tables = [s.block_table for s in decodes] + [s.block_table for s, _ in prefills]
        if deferred and self.launcher is not None:
            tables = [list(t) for t in tables]
        step = StepInput(kind, [[s.token_ids[-1]] for s in decodes]
                         + [s.token_ids[s.num_cached:s.num_cached + n] for s, n in prefills],
                         [s.num_cached for s in decodes]
                         + [s.num_cached for s, _ in prefills],
                         tables,
                         need_logits=[True] * len(decodes) + [id(s) in ok for s, _ in prefills],
                         num_decode=len(decodes),
                         feed=feed if any(f >= 0 for f in feed) else None)
        if any(s.prompt_logprobs is not None for s, _ in prefills):
            # Position p of a chunk predicts token p + 1, kept while that is a prompt token.
            step.prompt_logprobs = [-1] * len(decodes) + [
                -1 if s.prompt_logprobs is None else s.params.prompt_logprobs for s, _ in prefills]
            step.prompt_targets = [[] for _ in decodes] + [
                s.token_ids[s.num_cached + 1:min(s.num_cached + n + 1, s.num_prompt_tokens)]
                for s, n in prefills]
        if prefills and self.drafter is not None:
            # Before the target's launch: were it to raise after a deferred launch, that
            # launch's tokens would be lost with the runner's `last_sampled` already replaced
            # by them, and the next step's decode rows fed from the wrong tokens.
            self.drafter.prefill(StepInput("prefill", step.tokens[len(decodes):],
                                           step.num_cached[len(decodes):],
                                           step.block_tables[len(decodes):]))
        if deferred:
            tokens = self.launcher.submit(step, sampling) if self.launcher is not None \
                else self.runner.launch_step(step, sampling)
        else:
            if self.launcher is not None:
                self.launcher.drain()
            results = self.runner.sample_step(step, sampling)
            for j, (seq, _) in enumerate(prefills):  # before num_cached moves past the chunk
                if len(decodes) + j in results.prompt_logprobs:
                    self.output_processor.record_prompt_logprobs(
                        seq, results.prompt_logprobs[len(decodes) + j])
            tokens = PendingTokens(rows=results)
        self.counters["decode_steps"] += bool(decodes)
        self.counters["prefill_steps"] += bool(prefills)
        self.counters["mixed_steps"] += bool(decodes and prefills)
        for seq in decodes:
            seq.num_cached += 1
        for seq, n in prefills:
            # Prompt tokens computed for the first time: a preempted sequence's recompute (of
            # its prompt and of the tokens it generated) is no new prompt token.
            counted = min(seq.num_cached + n, seq.num_prompt_tokens)
            self.counters["prompt_tokens"] += max(0, counted - max(seq.num_cached,
                                                                   seq.num_prompt_counted))
            seq.num_prompt_counted = max(seq.num_prompt_counted, counted)
            seq.num_cached += n
            seq.draft_cached = seq.num_cached
            self._register(seq)
        inflight = InFlight(tokens, [], deferred=deferred)
        for seq in decodes + [s for s, _ in prefills if id(s) in ok]:
            inflight.row_of[id(seq)] = len(inflight.rows)
            seq.token_ids.append(PLACEHOLDER)
            seq.num_pending += 1
            inflight.rows.append((seq, len(seq.token_ids) - 1))
        return inflight

    @staticmethod
    def _needs_host(seqs) -> bool:
        """Whether a step of these sequences must be sampled in step with the host: penalties
        and min_tokens read the tokens sampled so far, log-probabilities come back with the
        tokens; overlapped steps only carry token ids."""
        return any(s.sampled_on_host for s in seqs)

    def _resolve(self, inflight: InFlight) -> list[Sequence]:
        """Read a launched step's tokens back and put them in place of their placeholders:
        stop conditions, text, page registration. A sequence finished meanwhile (stopped by
        an earlier token, aborted, failed) is skipped; one that stops here drops the
        placeholders of the step launched after this one."""
        with self.step_timer.phase("wait"):
            try:
                tokens = inflight.tokens.result()
            except BaseException:
                self._recompute_after_lost_step()
                raise
        with self.step_timer.phase("resolve"):
            touched = []
            for (seq, pos), token in zip(inflight.rows, tokens):
                if seq.finish_reason is not None:
                    continue
                later = seq.token_ids[pos + 1:]  # placeholders of a step launched since
                del seq.token_ids[pos:]
                seq.num_pending -= 1 + len(later)
                touched.append(seq)
                if isinstance(token, str):  # its sampling failed in the runner
                    self.output_processor.fail(seq, token)
                    continue
                appended = self.output_processor.append_or_fail(seq, [token])
                if seq.finish_reason is None:
                    seq.token_ids.extend(later)
                    seq.num_pending += len(later)
                if appended is not None:
                    self._register(seq)
        return touched

    def _recompute_after_lost_step(self) -> None:
        """Undo what the launch of a step whose tokens never came back (its launch failed on
        the launch thread, or reading it back raised) assumed: its rows' placeholders, their
        cache counts, the pages it registered for the prefix cache before writing them, and
        the same of any step launched after it. Every running sequence is preempted (its
        tokens recomputed from what was read back, as after any preemption), the prefix
        cache is emptied (a registered page may hold nothing), and the launch thread is
        drained, so that the next `step` goes on as after a failed step that was not
        overlapped."""
        if self.launcher is not None:
            try:
                self.launcher.drain()
            except Exception:  # noqa: BLE001 - the lost step's own failure, raised already
                pass
        self.scheduler.preempt_all()
        for seq in self.scheduler.waiting:
            if seq.num_pending:  # placeholders of tokens that will never come
                del seq.token_ids[len(seq.token_ids) - seq.num_pending:]
                seq.num_pending = 0
        self.block_manager.reset_prefix_cache()

    def _speculative_decode(self, seqs: list[Sequence], k: int) -> list[Sequence]:
        """A verify step: draft k tokens per sequence, run them through the target with each
        sequence's last token and keep the accepted ones (timed as the step's launch, its
        drafting apart, and its resolve)."""
        timer = self.step_timer
        if self._inflight is not None or any(s.num_pending for s in seqs):
            raise RuntimeError("a verify step must not start before the step in flight is "
                               "read back")
        with timer.phase("launch"):
            if self.launcher is not None:  # every launch made before the runner is used here
                self.launcher.drain()
            self.counters["decode_steps"] += 1
            sampling, seqs = self._sampling(seqs)
            if self.drafter.deterministic:
                # Its drafts are lists, made from the tokens alone (no sampling tensors); the
                # step's token rows travel as lists (to other processes, too).
                st = None
            else:
                # A draft model's stay on its device with the distributions they were drawn from.
                sampling, seqs, st = self._drafting_tensors(sampling, seqs, self.device)
            if not seqs:
                return []
            drafted_for = list(seqs)
            try:
                with timer.phase("draft"):
                    drafts, draft_probs = self.drafter.propose(seqs, st)  # (B, k)
                if isinstance(drafts, list) and any(s.params.bad_words for s in seqs):
                    # Each of the k + 1 positions bans what the output and the drafts before it
                    # make bad (`_lookahead` takes no bad words with drafts on the device).
                    sampling, seqs, drafts = self._with_bans(sampling, seqs, drafts)
                    if not seqs:
                        return []
                if isinstance(drafts, list):
                    fed = [[s.token_ids[-1], *row] for s, row in zip(seqs, drafts)]
                else:
                    last = torch.tensor([[s.token_ids[-1]] for s in seqs], dtype=torch.int64,
                                        device=drafts.device)
                    fed = torch.cat((last, drafts), 1)
                # (The runner reads the page lists here and now: the launch thread is drained.)
                step = StepInput("decode", fed, [s.num_cached for s in seqs],
                                 [s.block_table for s in seqs])
                results = self.runner.verify_step(step, sampling, draft_probs)
            except BaseException:
                # A draft model counts its drafts as cached once it has proposed them, for
                # the verification to cut back to what it accepts; with no verification,
                # every later proposal found its cache ahead of the tokens and raised.
                for seq in drafted_for:
                    seq.draft_cached = min(seq.draft_cached, len(seq) - 1)
                raise
        with timer.phase("resolve"):
            bm = self.block_manager
            drafted = accepted = 0
            for seq, result in zip(seqs, results):
                if isinstance(result, str):  # its verification failed in the runner
                    self.output_processor.fail(seq, result)
                    continue
                row, n_acc = result
                old_len, old = len(seq.token_ids), seq.num_cached
                appended = self.output_processor.append_or_fail(seq, row[:n_acc + 1])
                if appended is None:
                    continue
                seq.num_cached = old + appended
                seq.draft_cached = min(seq.draft_cached, old_len + n_acc)
                drafted += k
                accepted += n_acc
                bm.trim(seq, seq.num_cached + 1)
                self._register(seq)
            self.counters["draft_tokens"] += drafted
            self.counters["accepted_tokens"] += accepted
        return seqs

    def _with_bans(self, sampling: SamplingInput, seqs: list[Sequence], drafts: list):
        """`sampling` with each row's bad-word bans at each verified position
        (`SamplingInput.ahead`); a row whose bans cannot be made fails alone. Returns
        (sampling, seqs, drafts) of the others."""
        ahead, ok = [], []
        for i, (seq, row) in enumerate(zip(seqs, drafts)):
            try:
                ahead.append(verify_bans(seq.params, seq.output_token_ids, row)
                             if seq.params.bad_words else [])
                ok.append(i)
            except Exception as err:  # noqa: BLE001 - that request alone fails
                self.output_processor.fail(seq, err)
        if len(ok) < len(seqs):
            sampling = sampling.select(ok) if ok else None
            seqs, drafts = [seqs[i] for i in ok], [drafts[i] for i in ok]
        if sampling is not None:
            sampling.ahead = ahead
        return sampling, seqs, drafts

    def _drafting_tensors(self, sampling: SamplingInput | None, seqs: list[Sequence], device):
        """`sampling` as tensors on `device` for the drafter. Rows whose settings the device
        cannot hold fail alone here; returns (sampling, seqs, tensors) of the others."""
        if not seqs:
            return None, [], None
        try:
            return sampling, seqs, sampling.tensors(device)
        except Exception:  # noqa: BLE001 - find the rows that fail on their own
            pass
        ok = []
        for i, seq in enumerate(seqs):
            try:
                sampling.select([i]).tensors(device)
                ok.append(i)
            except Exception as err:  # noqa: BLE001 - that request alone fails
                self.output_processor.fail(seq, err)
        if not ok:
            return None, [], None
        sampling = sampling.select(ok)
        return sampling, [seqs[i] for i in ok], sampling.tensors(device)

    def _register(self, seq: Sequence) -> None:
        if not self.block_manager.enable_prefix_caching:  # nothing reads registered pages
            return
        # With a drafter that keeps a cache, a page is shared only once both caches hold all
        # its tokens.
        written = None if self.drafter is None else self.drafter.cache_written(seq)
        self.block_manager.register_full_pages(seq, written)

    # Introspection for metrics and tests.
    def stats(self) -> dict:
        bm = self.block_manager
        return dict(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                    pages_total=bm.num_usable_pages, pages_used=bm.num_used_pages,
                    page_size=bm.page_size, preemptions=self.scheduler.num_preemptions,
                    prefix_hit_pages=bm.prefix_hits, **self.counters)

    def check_invariants(self) -> None:
        """Raise if any page is leaked or double-counted."""
        self.output_processor.check(sum(len(group) for group in self.requests.values()))
        live = self.scheduler.running + list(self.scheduler.waiting)
        self.block_manager.check(live)

    def check_workers(self) -> None:
        """Raise `WorkerError` if a worker process (a tensor-parallel rank) has died or is
        stuck; nothing in one process. For callers that wait between steps (the server), so
        that a failure shows before the next request runs into it."""
        if hasattr(self.runner, "check"):
            self.runner.check()

    def shutdown(self) -> None:
        if self.launcher is not None:
            self.launcher.shutdown()
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()
