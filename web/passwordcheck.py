"""The password-hashing pool of one webmail process, with a bounded queue in front of it.

Hashing is slow on purpose, so it runs on a small pool of threads: a burst of
log-ins cannot take all the CPU from people reading their mail.  Without a
bound, a burst would instead queue up behind the pool and hold every gunicorn
thread waiting for its turn; here at most `password_check_queue` checks wait,
and one more is answered "busy" at once.  A check that takes longer than
`password_check_timeout` gives up waiting (its slot stays taken until the
hash really finishes, so the bound holds).
"""

from __future__ import annotations

import enum
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from fallback.mailbox import passwords

WORKERS = 2  # hashing threads per webmail process


class Outcome(enum.Enum):
    RIGHT = "right"
    WRONG = "wrong"
    BUSY = "busy"            # the queue was full: not checked
    TIMED_OUT = "timed_out"  # not known in time: a failure for the throttle


class PasswordChecks:
    def __init__(self, queue: int, timeout: float, workers: int = WORKERS) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="password")
        self.capacity = workers + queue  # running plus waiting
        self.timeout = timeout
        self._lock = threading.Lock()
        self._taken = 0

    def in_use(self) -> int:
        """Checks running or waiting now."""
        with self._lock:
            return self._taken

    def _release(self, _: Future[bool]) -> None:
        with self._lock:
            self._taken -= 1

    def check(self, plain: str, stored: str) -> Outcome:
        with self._lock:
            if self._taken >= self.capacity:
                return Outcome.BUSY
            self._taken += 1
        try:
            future = self.pool.submit(passwords.verify_password, plain, stored)
        except BaseException:
            self._release(Future())
            raise
        future.add_done_callback(self._release)
        try:
            return Outcome.RIGHT if future.result(timeout=self.timeout) else Outcome.WRONG
        except FutureTimeout:
            return Outcome.TIMED_OUT

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
