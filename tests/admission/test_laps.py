"""LAPS admission queues: room, classes, batching window, aging, bounded waits, moves."""

from __future__ import annotations

import random

import pytest

from router.admission import NotQueued, Release, build_admission
from router.admission.classes import AdaptiveBoundary
from router.admission.laps import LapsAdmission
from router.admission.window import AdaptiveWindow
from router.policy.interfaces import Decision, RoutingRequest
from router.policy.predictor import PrefillTimeModel


def _req(rid: str, tokens: int) -> RoutingRequest:
    return RoutingRequest(rid, list(range(tokens)), 8)


def _dec(instance: str, candidates: tuple[str, ...] = ()) -> Decision:
    return Decision(instance, "affinity", candidates or (instance,))


def _laps(**params: object) -> LapsAdmission:
    # LAPS's own order (arrival order, hard bound max_wait_s) unless a test says otherwise.
    defaults: dict[str, object] = {"budget_tokens": 1000, "long_age_s": 1.0, "max_wait_s": 3.0,
                                   "adaptive_boundary": False, "max_window_s": 0.0,
                                   "order": "fifo"}
    defaults.update(params)
    admission = build_admission("laps", **defaults)
    assert isinstance(admission, LapsAdmission)
    return admission


def _ids(releases: list[Release]) -> list[str]:
    return [r.request_id for r in releases]


def test_none_passes_every_request_through_at_once() -> None:
    admission = build_admission("none")
    releases = admission.submit(_req("a", 5000), _dec("i0"), 1.0)
    assert _ids(releases) == ["a"] and releases[0].reason == "pass"
    assert admission.next_deadline() is None and admission.queued() == []
    with pytest.raises(NotQueued):
        admission.move("a", _dec("i1"), 1.0)


@pytest.mark.parametrize("order", ["fifo", "goodput"])
def test_release_only_while_the_instance_has_room(order: str) -> None:
    admission = _laps(order=order)
    # An idle instance takes a prompt larger than the budget (else it could never go).
    assert _ids(admission.submit(_req("big", 5000), _dec("i0"), 0.0)) == ["big"]
    # No room now: both wait, whatever their class; another instance is unaffected.
    assert admission.submit(_req("s1", 100), _dec("i0"), 0.1) == []
    assert admission.submit(_req("l1", 600), _dec("i0"), 0.2) == []
    assert _ids(admission.submit(_req("other", 100), _dec("i1"), 0.2)) == ["other"]
    assert [q.request.request_id for q in admission.queued("i0")] == ["s1", "l1"]
    # The big prompt's first token frees the room: shorts first (the younger one too),
    # then the long, as long as there is room.
    assert admission.submit(_req("s2", 100), _dec("i0"), 0.3) == []
    released = admission.on_first_token("big", 0.4)
    assert _ids(released) == ["s1", "s2", "l1"]  # shorts first, then the long (room left)
    assert all(r.reason == "room" for r in released)
    assert released[0].waited_s == pytest.approx(0.3)


@pytest.mark.parametrize("order", ["fifo", "goodput"])
def test_shorts_overtake_a_young_long_but_an_aged_long_goes_first(order: str) -> None:
    young = _laps(order=order)
    young.submit(_req("big", 5000), _dec("i0"), 0.0)
    young.submit(_req("long", 900), _dec("i0"), 0.0)
    young.submit(_req("s1", 100), _dec("i0"), 0.1)
    assert _ids(young.on_first_token("big", 0.5)) == ["s1", "long"]
    aged = _laps(order=order)
    aged.submit(_req("big", 5000), _dec("i0"), 0.0)
    aged.submit(_req("long", 900), _dec("i0"), 0.0)
    aged.submit(_req("s1", 100), _dec("i0"), 1.1)
    # At 1.5 s the long waited past long_age_s (1 s): it goes before the short.
    assert _ids(aged.on_first_token("big", 1.5)) == ["long", "s1"]


def test_no_long_request_waits_past_its_bound_under_a_stream_of_shorts() -> None:
    """A saturating stream of shorts (each taking the whole room until its first token)
    never lets the long through on room alone; aging and the hard bound do."""
    admission = _laps(budget_tokens=200, long_age_s=0.5, max_wait_s=2.0)
    released_at: dict[str, float] = {}
    inflight: list[tuple[float, str]] = []  # (first-token time, id)
    now = 0.0
    admission.submit(_req("long", 5000), _dec("i0"), 0.0)  # idle: goes at once
    released_at["long"] = 0.0
    inflight.append((0.2, "long"))
    admission.submit(_req("long2", 5000), _dec("i0"), 0.01)
    k = 0

    def forward(releases: list[Release], at: float) -> None:
        for r in releases:
            assert r.request_id not in released_at
            released_at[r.request_id] = at
            inflight.append((at + 0.05, r.request_id))  # every prefill takes 50 ms

    while now < 6.0:
        now = round(now + 0.01, 6)
        k += 1
        forward(admission.submit(_req(f"s{k}", 150), _dec("i0"), now), now)
        for done in [x for x in inflight if x[0] <= now]:
            inflight.remove(done)
            forward(admission.on_first_token(done[1], now), now)
        deadline = admission.next_deadline()
        if deadline is not None and deadline <= now:
            forward(admission.tick(now), now)
    assert "long2" in released_at
    assert released_at["long2"] - 0.01 <= 2.0 + 1e-9
    # Aging lets it through on room well before the hard bound: 0.5 s + one short's prefill.
    assert released_at["long2"] - 0.01 <= 0.5 + 0.1
    # And the shorts kept flowing (none waited past the bound either).
    counters = admission.counters()
    assert counters["wait_s_max"]["short"] <= 2.0 + 1e-9
    assert counters["released"]["room"] > 100


def test_hard_bound_releases_without_room_on_tick() -> None:
    admission = _laps(max_wait_s=2.0)
    admission.submit(_req("big", 5000), _dec("i0"), 0.0)
    admission.submit(_req("held", 5000), _dec("i0"), 0.5)
    assert admission.next_deadline() == pytest.approx(1.5)  # aging of the long
    assert admission.tick(1.5) == []  # aged, but still no room
    assert admission.next_deadline() == pytest.approx(2.5)
    released = admission.tick(2.5)
    assert _ids(released) == ["held"] and released[0].reason == "aged"
    assert admission.next_deadline() is None


@pytest.mark.parametrize("order", ["fifo", "goodput"])
def test_a_queued_request_can_move_until_released_and_is_never_sent_twice(order: str) -> None:
    rng = random.Random(7)
    admission = _laps(budget_tokens=300, order=order)
    sent: dict[str, str] = {}
    inflight: list[str] = []
    now = 0.0
    for k in range(400):
        now += 0.01
        rid = f"r{k}"
        for r in admission.submit(_req(rid, rng.choice((50, 120, 800))),
                                  _dec(f"i{rng.randrange(3)}"), now):
            assert r.request_id not in sent
            sent[r.request_id] = r.instance_id
            inflight.append(r.request_id)
        queued = admission.queued()
        if queued and rng.random() < 0.5:
            q = rng.choice(queued)
            target = f"i{rng.randrange(3)}"
            for r in admission.move(q.request.request_id,
                                    Decision(target, "rebalance", (q.instance_id, target)),
                                    now):
                assert r.request_id not in sent
                sent[r.request_id] = r.instance_id
                inflight.append(r.request_id)
        if inflight and rng.random() < 0.6:
            done = inflight.pop(0)
            for r in admission.on_first_token(done, now):
                assert r.request_id not in sent
                sent[r.request_id] = r.instance_id
                inflight.append(r.request_id)
        # A released request cannot be moved any more.
        if sent:
            with pytest.raises(NotQueued):
                admission.move(next(iter(sent)), _dec("i0"), now)
    # Drain everything with ticks: every request is sent exactly once.
    while admission.queued():
        now = max(now, admission.next_deadline() or now) + 1e-6
        for r in admission.tick(now):
            assert r.request_id not in sent
            sent[r.request_id] = r.instance_id
    assert len(sent) == 400
    assert sum(admission.counters()["moves"].values()) > 0


@pytest.mark.parametrize("order", ["fifo", "goodput"])
def test_a_moved_request_keeps_its_wait_and_goes_where_it_was_moved(order: str) -> None:
    admission = _laps(order=order)
    admission.submit(_req("big", 5000), _dec("i0"), 0.0)
    admission.submit(_req("q", 100), _dec("i0", ("i0", "i1")), 0.2)
    admission.submit(_req("busy", 5000), _dec("i1"), 0.3)  # i1 busy too
    assert admission.move("q", Decision("i1", "rebalance", ("i0", "i1")), 0.4) == []
    assert admission.queued("i0") == []
    released = admission.on_first_token("busy", 0.9)
    assert _ids(released) == ["q"] and released[0].instance_id == "i1"
    assert released[0].enqueued_at == 0.2 and released[0].moves == 1
    assert admission.counters()["moves"] == {"rebalance": 1}


def test_cancel_drops_a_queued_request() -> None:
    admission = _laps()
    admission.submit(_req("big", 5000), _dec("i0"), 0.0)
    admission.submit(_req("q", 100), _dec("i0"), 0.1)
    assert admission.cancel("q") and not admission.cancel("q")
    assert admission.on_first_token("big", 0.5) == []


def test_adaptive_boundary_starts_at_256_and_follows_the_traffic() -> None:
    boundary = AdaptiveBoundary(256, short_quantile=0.5, min_samples=32, update_every=8)
    assert boundary.tokens == 256 and boundary.classify(256) == "short"
    assert boundary.classify(257) == "long"
    for k in range(64):
        boundary.observe(2000 + k)  # a long-document workload
    assert 2000 <= boundary.tokens <= 2064
    for _ in range(600):
        boundary.observe(40)  # a chat workload: it comes down, bounded below
    assert boundary.tokens == boundary.min_tokens == 64
    fixed = AdaptiveBoundary(256, adaptive=False)
    for _ in range(100):
        fixed.observe(5000)
    assert fixed.tokens == 256


def test_adaptive_window_waits_only_when_a_batch_can_fill() -> None:
    window = AdaptiveWindow(batch_size=4, max_window_s=0.02)
    for k in range(20):
        window.observe("busy", k * 0.002)  # a short every 2 ms: 3 more in 6 ms
        window.observe("quiet", k * 0.5)  # every 0.5 s: a batch would take 1.5 s
    assert window.window_s("busy") == pytest.approx(0.006)
    assert window.window_s("quiet") == 0.0
    assert window.window_s("never-seen") == 0.0


def test_shorts_are_held_for_the_window_then_released_as_a_batch() -> None:
    admission = _laps(max_window_s=0.05, batch_size=3, budget_tokens=10_000)
    admission.submit(_req("warm", 100), _dec("i0"), 0.0)  # idle: released
    releases: list[Release] = []
    for k in range(1, 3):  # shorts every 10 ms while something is in flight
        releases += admission.submit(_req(f"s{k}", 100), _dec("i0"), k * 0.01)
    assert releases == [] and admission.window.window_s("i0") > 0
    releases = admission.submit(_req("s3", 100), _dec("i0"), 0.03)  # batch of 3 complete
    assert _ids(releases) == ["s1", "s2", "s3"]
    # A lone short is released when its window runs out.
    assert admission.submit(_req("s4", 100), _dec("i0"), 0.04) == []
    deadline = admission.next_deadline()
    assert deadline is not None and 0.04 < deadline <= 0.04 + 0.05
    assert _ids(admission.tick(deadline)) == ["s4"]


# ---- goodput (SLO-aware) release order ------------------------------------------------


def _goodput(**params: object) -> LapsAdmission:
    return _laps(order="goodput", slo_ttft_s=3.0, **params)


def test_goodput_order_releases_a_feasible_request_before_an_infeasible_one() -> None:
    """Overload: ``old`` waited past the SLO by the time room opens, ``new`` can still
    make it. FIFO releases ``old`` at its bound whatever the room; goodput order sends
    ``new`` into the room first and ``old`` only when nothing feasible is left."""
    fifo = _laps(budget_tokens=500)
    fifo.submit(_req("big", 5000), _dec("i0"), 0.0)
    fifo.submit(_req("old", 100), _dec("i0"), 0.1)
    fifo.submit(_req("new", 500), _dec("i0"), 2.9)
    aged = fifo.tick(3.1)  # old's bound (SLO): out, no room or not
    assert _ids(aged) == ["old"] and aged[0].reason == "aged"

    admission = _goodput(budget_tokens=500)
    admission.submit(_req("big", 5000), _dec("i0"), 0.0)
    admission.submit(_req("old", 100), _dec("i0"), 0.1)
    admission.submit(_req("new", 500), _dec("i0"), 2.9)
    assert admission.tick(3.1) == []  # no room, and 3 s is no bound in goodput order
    # Rebalancing may move only what can still make the SLO.
    assert [q.request.request_id for q in admission.movable(3.2)] == ["new"]
    assert [q.request.request_id for q in fifo.movable(3.2)] == ["new"]  # old is out
    # Room at 3.5 s: old (waited 3.4 s) cannot make the 3 s SLO, new (0.6 s) can.
    released = admission.on_first_token("big", 3.5)
    assert _ids(released) == ["new"] and released[0].reason == "room"
    assert admission.is_deferred("old") and not admission.is_deferred("new")
    assert [q.request.request_id for q in admission.queued("i0")] == ["old"]
    # Room again and nothing feasible waiting: the deferred one goes.
    released = admission.on_first_token("new", 3.8)
    assert _ids(released) == ["old"] and released[0].reason == "deferred"
    counters = admission.counters()
    assert counters["order"] == "goodput" and counters["deferrals"] == 1
    assert counters["released"] == {"room": 2, "aged": 0, "deferred": 1}


def test_goodput_defers_a_prompt_whose_predicted_prefill_alone_exceeds_the_slo() -> None:
    # 1 ms per token: a 5,000-token prompt needs ~5 s of prefill, over the 3 s SLO even
    # on an idle instance; the shorts queued after it go first.
    admission = _goodput(budget_tokens=500, predictor=PrefillTimeModel(1e-3))
    admission.submit(_req("busy", 500), _dec("i0"), 0.0)  # takes the whole room
    admission.submit(_req("huge", 5000), _dec("i0"), 0.1)
    admission.submit(_req("s1", 100), _dec("i0"), 0.2)
    admission.submit(_req("s2", 100), _dec("i0"), 0.3)
    released = admission.on_first_token("busy", 0.5)
    assert _ids(released) == ["s1", "s2", "huge"]  # shorts, then the room left: huge
    assert released[2].reason == "deferred"
    # On an idle instance it is not held back: nothing else waits, so it goes at once.
    assert _ids(admission.submit(_req("huge2", 5000), _dec("i1"), 1.0)) == ["huge2"]


def test_goodput_learns_the_prefill_speed_from_its_own_releases() -> None:
    admission = _goodput(budget_tokens=10_000)
    before = admission.predictor.params("i0")
    # Each 2,000-token prompt takes 1 s from release to first token on an idle instance.
    for k in range(30):
        t = 2.0 * k
        admission.submit(_req(f"r{k}", 2000), _dec("i0"), t)
        admission.on_first_token(f"r{k}", t + 1.0)
        admission.on_finished(f"r{k}", t + 1.5)
    fixed, per_token = admission.predictor.params("i0")
    assert (fixed, per_token) != before
    assert fixed + 2000 * per_token == pytest.approx(1.0, rel=0.05)
    assert admission.predictor.params("i1") == before  # per instance


def test_goodput_no_request_waits_past_the_deferral_bound_under_a_stream_of_feasible_ones(
) -> None:
    """A saturating stream of shorts that can each still make the SLO when they arrive:
    room, whenever it opens, always finds a feasible one, so deferred requests (the huge
    prompt, and every short that waited past the SLO) never get room on their own. The
    bound releases each by ``defer_max_s``; the fresh shorts keep meeting the SLO."""
    slo, bound = 0.5, 2.0
    admission = _laps(order="goodput", slo_ttft_s=slo, defer_max_s=bound, budget_tokens=200,
                      long_age_s=0.2, predictor=PrefillTimeModel(1e-3))
    submitted: dict[str, float] = {}
    released: dict[str, Release] = {}
    inflight: list[tuple[float, str]] = []  # (first-token time, id)

    def forward(releases: list[Release], at: float) -> None:
        for r in releases:
            assert r.request_id not in released
            released[r.request_id] = r
            inflight.append((at + 0.05, r.request_id))  # every prefill takes 50 ms

    def submit(rid: str, tokens: int, at: float) -> None:
        submitted[rid] = at
        forward(admission.submit(_req(rid, tokens), _dec("i0"), at), at)

    submit("first", 200, 0.0)  # takes the whole room
    submit("huge", 5000, 0.005)  # ~5 s of predicted prefill: deferred at once
    now, k = 0.0, 0
    while now < 8.0:
        now = round(now + 0.01, 6)
        k += 1
        # The timer fires on time (as the gateway's and the simulator's do).
        while (deadline := admission.next_deadline()) is not None and deadline <= now:
            forward(admission.tick(deadline), deadline)
        submit(f"s{k}", 150, now)  # 100 shorts/s against 20/s served: overload
        for done in [x for x in inflight if x[0] <= now]:
            inflight.remove(done)
            forward(admission.on_first_token(done[1], now), now)
    counters = admission.counters()
    # Every request submitted more than the bound ago is out, and none waited past it.
    for rid, at in submitted.items():
        if at <= now - bound - 0.01:
            assert rid in released, rid
    assert max(r.waited_s for r in released.values()) <= bound + 1e-9
    assert max(counters["wait_s_max"].values()) <= bound + 1e-9
    # The huge prompt never got room while feasible shorts waited: the bound let it out.
    assert released["huge"].reason == "aged"
    assert released["huge"].waited_s == pytest.approx(bound, abs=0.011)
    # The room went to requests that could still make it (every release for room waited
    # less than the SLO); the bound's releases, room or not, take the rest of it.
    room = [r for r in released.values() if r.reason == "room"]
    assert len(room) > 50
    assert sum(r.waited_s <= slo for r in room) == len(room)
    assert counters["deferrals"] > 100 and counters["released"]["aged"] > 100


def test_goodput_deferred_budget_holds_deferred_requests_while_prefill_is_in_flight() -> None:
    admission = _goodput(budget_tokens=1000, deferred_budget_tokens=1)
    admission.submit(_req("busy", 1000), _dec("i0"), 0.0)
    admission.submit(_req("old", 100), _dec("i0"), 0.1)
    admission.submit(_req("new", 100), _dec("i0"), 3.0)
    # At 3.5 s old missed the SLO; new goes, and though there is room left, old waits
    # for the instance's prefill to drain.
    assert _ids(admission.on_first_token("busy", 3.5)) == ["new"]
    assert admission.is_deferred("old")
    released = admission.on_first_token("new", 3.6)
    assert _ids(released) == ["old"] and released[0].reason == "deferred"


def test_fleet_defaults_are_goodput_order_with_one_iteration_for_deferred_requests() -> None:
    from router.admission import admission_defaults

    admission = build_admission("laps", **admission_defaults(2.0, 4096))
    assert isinstance(admission, LapsAdmission)
    assert admission.order == "goodput" and admission.slo_ttft_s == 2.0
    assert admission.bound_s == admission.defer_max_s == 20.0
    assert (admission.budget_tokens, admission.deferred_budget_tokens) == (8192, 4096)
    assert LapsAdmission(budget_tokens=1000).deferred_budget_tokens == 500
    with pytest.raises(ValueError, match="order"):
        LapsAdmission(order="edf")
