"""The single inference thread: a bounded queue and micro-batching by image.

Why one thread: the model is not thread-safe (the Segmenter caches one image embedding) and on a
CPU or a single GPU parallel calls only fight over the same cores. Requests are queued (bounded:
a full queue answers 503 with ``Retry-After`` instead of letting latency grow without limit); the
thread takes everything waiting (up to ``max_batch`` requests), groups it by image hash and runs
each image once with the phrases of all its requests, so N clients asking about the same image
pay for one image encoding.

Why not Ray Serve's ``@serve.batch`` or LitServe: the same-image grouping would stay ours under
either, and on one machine they start far slower and use several processes for no more
throughput (``benchmarks/serve_load.py`` measures both); Ray Serve pays off once replicas span GPUs
or machines (``sspsam serve --ray``).
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from sspsam.serve.errors import ApiError


@dataclass
class Job:
    kind: str  # "segment" or "ovss"
    key: str  # image hash: jobs with the same key share one image encoding
    rgb: np.ndarray
    texts: list[str]  # cleaned phrases or classes
    future: cf.Future = field(default_factory=cf.Future)
    allow_unknown: bool = False  # ask the model even phrases with no word it knows




class Worker:
    """The single inference thread and its bounded queue."""

    def __init__(self, segmenter, ovss, queue_size: int, max_batch: int):
        self.segmenter, self.ovss = segmenter, ovss
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.max_batch = max_batch
        self.batch_s = 0.1  # moving average of one drain's wall time, for Retry-After
        self.stats = {"batches": 0, "jobs": 0, "model_calls": 0}
        self._thread = threading.Thread(target=self._run, name="sspsam-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:  # the thread is stuck in a model call; it is a daemon, let it go
            return
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def retry_after(self) -> int:
        """Seconds until the queue has probably drained: waiting batches times the recent batch time."""
        return max(1, math.ceil(self.batch_s * (self.queue.qsize() / self.max_batch + 1)))

    def submit(self, job: Job) -> cf.Future:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            after = self.retry_after()
            raise ApiError(503, "busy", f"the server is busy ({self.queue.maxsize} requests waiting); retry in {after} s",
                           {"Retry-After": str(after)}) from None
        return job.future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            job = self.queue.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                jobs.append(nxt)
            t0 = time.perf_counter()
            # a job whose client timed out is cancelled and skipped here
            self._run_batch([j for j in jobs if j.future.set_running_or_notify_cancel()])
            self.batch_s = 0.8 * self.batch_s + 0.2 * (time.perf_counter() - t0)

    def _run_batch(self, jobs: list[Job]) -> None:
        self.stats["batches"] += 1
        self.stats["jobs"] += len(jobs)
        groups: dict[tuple, list[Job]] = {}
        for j in jobs:
            groups.setdefault((j.kind, j.key, j.allow_unknown) if j.kind == "segment" else (j.kind, j.key, tuple(j.texts)), []).append(j)
        for (kind, *_), group in groups.items():
            self.stats["model_calls"] += 1
            try:
                if kind == "segment":
                    phrases = list(dict.fromkeys(p for j in group for p in j.texts))
                    if hasattr(self.segmenter, "surface"):
                        self.segmenter.surface = "http"
                    res = self.segmenter.segment(group[0].rgb, phrases,
                                                 **({"allow_unknown_words": True} if group[0].allow_unknown else {}))
                    index = {p: i for i, p in enumerate(res.phrases)}
                    for j in group:
                        j.future.set_result(res.subset([index[p] for p in j.texts]))
                else:
                    res = self.ovss.segment(group[0].rgb, group[0].texts)
                    for j in group:
                        j.future.set_result(res)
            except Exception as exc:  # one bad group must not take the thread (and the others) down
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(exc)

