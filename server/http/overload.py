"""A server-wide limit on requests in progress that adapts to how long they take.

On one event loop, requests in progress share the CPU: past the point where
it is saturated, each one more in progress adds its share of time to every
other's answer, and the excess waits in the loop and the sockets, where no
model queue sees it (at 2x load with 512 connections: 100 % 2xx, p99 8 s,
every request late). So the protocol counts the requests in progress and
measures how long each one stays (headers in -> answer out), and a
controller moves the limit every ``TICK_S``.

A full server and an overloaded one look alike from inside (requests in
progress, each waiting its turn), but only the overloaded one is asked for
more than it answers. Sixty-four clients in a closed loop keep 64 requests
in progress and wait for each answer before they send again: refusing some
would only make them send again at once. Twice the sustainable rate in an
open loop is a queue that never drains, and whatever is let in beyond what
keeps the model busy only waits. So there are two regimes:

- **full**: when for two ticks running (a GC pause or one slow moment is
  let through, and so are ticks of fewer than ``MIN_SAMPLES`` answers) the
  mean time in the server of the answered requests, or the wait ahead of
  those in progress (their number over the answer rate: Little's law), was
  over ``target_s`` (or twice the time of a quiet request, if longer), the
  limit goes down to what the answer rate gets through in the target's
  time, never below ``floor`` (enough in progress to keep batches full:
  below it, each row costs more); under the target it grows by a tenth a
  tick up to ``ceiling`` (``limits.max_concurrent_requests``). Below
  saturation nothing is refused; a closed loop of up to ``floor`` clients
  never is.
- **shedding**, entered when for two ticks running more than ``EXCESS``
  of the requests were refused (demand beyond what is let in) and every
  request that started found at least ``STANDING`` others in progress (a
  queue that does not drain): the target becomes ``TIGHT`` times a quiet
  request's time (at least ``TIGHT_MIN_S``, at most the full target) and
  the limit may go down to ``LEAST``, so the accepted requests are answered
  about as fast as when the server is quiet and the excess, refused anyway,
  gets its 503 at once. The regime ends after two ticks in which demand
  (answered and refused) was within the best answer rate of the last
  ``CAPACITY_TICKS`` (load the server can take, though at the tight limit
  some of it finds the queue full: batches leave it in bursts), and the
  limit goes back to at least ``floor``.

In either regime, two ticks running with more than ``STORM`` refusals per
answer are clients that send again as soon as they are refused (a closed
loop that ignores Retry-After), not new demand: refusing them costs more than
letting them wait their turn, so the limit doubles (at least from ``floor``,
up to ``ceiling``), shedding ends, and for ``HOLD_TICKS`` the limit does not
shrink. A closed loop let in is refused no more: when the tick after the
raise still has half as many refusals, it was demand, not a storm; the limit
and regime go back to what they were, and for ``HOLD_TICKS`` no storm is
taken.

A quiet request's time is measured in the ticks with at most ``QUIET_LOAD``
requests in progress, at the tick and on average (the sum of their times
over the tick's length, by Little's law), and no refusals; a busy server
does not raise its own target.

A request over the limit is answered 503 with Retry-After at once, for a
fraction of the work of an answer. A request let in and then refused by its
model's queue (admission on queueing delay, ``server.core.admission``) is
marked ``SHED`` in its scope by the endpoint and counted here as refused, not
as an answer: it was quick, but only because it was turned away after its
body was read and decoded, the dearer half of an answer. Counted as answers,
such refusals kept the limit high while the model refused nearly everything
(2x load, 16-row requests: 330,000 of 390,000 requests refused by the model,
2 answers a second).
"""

from __future__ import annotations

from collections import deque

TICK_S = 0.05
SHED = "sluice.shed"  # scope key: the app refused this request as overloaded
# Enough requests in progress to keep batches full and threads busy: below it, batches
# shrink, each row costs more, and shedding would cut throughput instead of waiting.
FLOOR = 64
MIN_SAMPLES = 10  # fewer answers in a tick say too little about the time they take
QUIET_LOAD = 4.0  # requests in progress on average, at most, in a quiet tick
EXCESS = 0.05  # refused share of the requests of a tick that says demand exceeds the limit
STANDING = 4  # fewest others in progress every request of a tick found: a standing queue
TIGHT = 3.0  # shedding: the target, in quiet requests' times
TIGHT_MIN_S = 0.003
# Shedding: fewest requests in progress allowed. At 8, 16-row fraud requests on one core
# starved: the loop, busy refusing, held the GIL while the inference thread waited for it,
# and answers fell from 7,000 to 700 a second.
LEAST = 16
CAPACITY_TICKS = 20  # shedding: the answer rate it can sustain, the best of this many ticks
# Refusals per answer beyond which the refused are sending again at once, not arriving:
# twice the sustainable rate in an open loop is about 1 (measured), a closed loop of 64
# refused down to LEAST is over 100.
STORM = 8.0
HOLD_TICKS = 100  # after a storm, 5 s in which the limit does not shrink
_NONE = 1 << 30  # "no request started this tick", for ``fewest``


class AdaptiveLimit:
    """The limit and the measurements that move it (event-loop thread only).

    The protocol updates ``active``, ``count``, ``total_s``, ``fewest``, ``refused``
    and ``shed`` directly on every request (attribute arithmetic costs less than a method
    call); ``adjust`` reads and resets them once a tick. With ``target_s``
    None the limit stays at ``ceiling``.
    """

    __slots__ = (
        "_before",
        "_below",
        "_calm",
        "_hold",
        "_over",
        "_quiet_s",
        "_rates",
        "_refused_seen",
        "_signs",
        "_storm",
        "_trial",
        "active",
        "ceiling",
        "count",
        "fewest",
        "floor",
        "limit",
        "refused",
        "shed",
        "shedding",
        "target_s",
        "total_s",
    )

    def __init__(self, target_s: float | None, ceiling: int, floor: int = FLOOR) -> None:
        self.target_s = target_s
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.limit = ceiling
        self.refused = 0  # requests refused, ever
        self.shed = 0  # requests let in and refused by their model's queue, since the tick
        self.active = 0  # requests let in and not answered yet
        self.count = 0  # answers since the last adjust
        self.total_s = 0.0  # their total time in the server
        self.fewest = _NONE  # fewest others in progress a request found at its start
        self.shedding = False
        self._refused_seen = 0
        self._quiet_s = 0.0  # moving average of the mean in quiet ticks
        self._over = False  # the last tick's mean was over the target
        self._signs = False  # the last tick showed excess demand and a standing queue
        self._rates: deque[float] = deque(maxlen=CAPACITY_TICKS)  # answers/s, shedding
        self._below = False  # shedding: the last tick's demand was within the capacity
        self._hold = 0  # ticks left in which the limit does not shrink (after a storm)
        self._storm = False  # the last tick had STORM refusals per answer
        self._trial = 0  # after a storm's raise: the refusals of the tick that raised it
        self._before = (ceiling, False)  # the limit and regime before that raise
        self._calm = 0  # ticks left in which no storm is taken (one turned out demand)

    @property
    def target(self) -> float:
        """The mean time in the server the limit is steered to."""
        assert self.target_s is not None
        full = max(self.target_s, 2.0 * self._quiet_s)
        if not self.shedding:
            return full
        return min(full, max(TIGHT_MIN_S, TIGHT * self._quiet_s))

    def finished(self, seconds: float) -> None:
        """One answered request stayed ``seconds`` in the server."""
        self.total_s += seconds
        self.count += 1

    def started(self, in_progress: int) -> None:
        """A request starts with ``in_progress`` others being answered."""
        if in_progress < self.fewest:
            self.fewest = in_progress

    def adjust(self, elapsed: float = TICK_S) -> None:
        """Move the limit from the requests seen since the last call, ``elapsed`` ago."""
        in_progress = self.active
        count, total, fewest = self.count, self.total_s, self.fewest
        self.count, self.total_s, self.fewest = 0, 0.0, _NONE
        refused, self._refused_seen = self.refused - self._refused_seen, self.refused
        shed, self.shed = self.shed, 0
        if self.target_s is None:
            return
        mean = total / count if count else 0.0
        rate = count / elapsed if elapsed > 0 else 0.0  # answers per second
        # Any answer counts here (a model slower than elapsed / QUIET_LOAD has fewer than
        # MIN_SAMPLES in a quiet tick); the moving average smooths them, and one answer
        # many times slower than the average (the first of a surge) moves it little.
        quiet_tick = in_progress <= QUIET_LOAD and total <= QUIET_LOAD * elapsed
        if count and not refused and not shed and quiet_tick:
            quiet = self._quiet_s
            sample = mean if quiet == 0.0 else min(mean, 4.0 * quiet)
            self._quiet_s = sample if quiet == 0.0 else quiet + 0.1 * (sample - quiet)
        if self._stormed(count, refused, shed):
            return
        # Not a storm: a model's refusals are excess demand let in, which the limit must
        # turn away before its body is decoded. So they count as refused, and more than
        # EXCESS of them is a limit letting in more than the model takes in its target.
        shed_over = shed > EXCESS * (count + shed)
        refused += shed
        signs = refused > EXCESS * (count + refused) and STANDING <= fewest < _NONE
        if self.shedding:
            # Demand (answered and refused) within what the server answers at best: the
            # load fits again, though some of it still finds the tight limit full.
            self._rates.append(rate)
            below = elapsed > 0 and (count + refused) / elapsed <= max(self._rates)
            if below and self._below:
                self.shedding = False
                self.limit = max(self.limit, self.floor)
                signs = below = False  # shedding again takes two ticks of signs
            self._below = below
        elif signs and self._signs and not self._hold:
            self.shedding = True
            self._rates.clear()
            self._rates.append(rate)
            self._below = False
        self._signs = signs
        floor = LEAST if self.shedding else self.floor
        target = self.target
        # The wait ahead of the requests in progress (Little's law) shows a queue building
        # a tick before the answers' mean does.
        ahead = in_progress / rate if rate else 0.0
        over = shed_over or (count >= MIN_SAMPLES and max(mean, ahead) > target)
        was_over, self._over = self._over, over
        if self._hold:
            self._hold -= 1
            over = False  # after a storm: the limit only grows
        if over and was_over:
            # As many as the answer rate gets through in the target's time (Little's law).
            self.limit = max(floor, min(self.limit, int(rate * target) + 1))
        elif over:
            return  # once may be a pause: wait for the next tick
        elif self.limit < self.ceiling:
            self.limit = min(self.ceiling, self.limit + max(1, self.limit // 10))

    def _stormed(self, count: int, refused: int, shed: int) -> bool:
        """Take a storm (or find that the last one was demand): True when the limit
        moved for it, and nothing else is to be done this tick."""
        if self._trial:
            trial, self._trial = self._trial, 0
            if 2 * refused > trial:
                # Let in, and still refused about as often: not a closed loop sending
                # again at once (let in, it is refused no more) but demand from more
                # clients than any limit lets in (a flash sale: ten refusals an answer).
                self.limit, self.shedding = self._before
                self._hold = 0
                self._calm = HOLD_TICKS
                return True
        if self._calm:
            self._calm -= 1
        storm = bool(count) and refused > STORM * (count + shed) and not self._calm
        was_storm, self._storm = self._storm, storm
        if storm and was_storm:
            # Refused clients sending again at once: each refusal comes straight back and
            # they cost more than waiting their turn would (128 closed-loop clients refused
            # down to 64: 60,000 refusals a second, answers from 9,300 to 2,900 a second).
            # Let them in, and do not shrink again for a while, unless the next tick shows
            # it was demand after all. Twice running: at 2x load shedding at 16, one tick
            # of few answers (a slow batch) gave 8.5 refusals per answer, and taking it for
            # a storm let 1,024 in, which the model then refused after decoding them (5 s
            # of no answers at all).
            self._before = (self.limit, self.shedding)
            self._trial = refused
            self.shedding = self._signs = self._over = False
            self.limit = min(self.ceiling, 2 * max(self.limit, self.floor))
            self._hold = HOLD_TICKS
            return True
        return False
