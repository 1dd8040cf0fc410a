"""The circuit breaker's probes (`dispatcher.health.CircuitBreaker`), on its own clock."""

from __future__ import annotations

from dispatcher.health import PROBING, CircuitBreaker

CIRCUIT = ("demo", "hooks.example")


def test_callbacks_sharing_a_probe_that_all_failed_still_probe_once_the_host_is_back() -> None:
    """20 callbacks fail on the host while its circuit is open: 16 probe each on their own,
    the others share one probe, and each of those fails once. The host comes back and only
    callbacks 19 and 20 have deliveries. A callback that failed leaves the shared probe to
    those that did not for a cool-down past its due, then takes it: its success closes the
    circuit. (Review: the failed ones were turned away for ever, and their deliveries
    ended unsent to a host that answered again.)"""
    breaker = CircuitBreaker(threshold=1, cooldown=30.0)
    now = 0.0
    assert breaker.record(CIRCUIT, False, 1, now=now)  # opens it
    callbacks = range(1, 21)
    for _ in range(8):  # cool-downs of failed probes, every callback asking
        now += 31
        for callback in callbacks:
            if breaker.wait(CIRCUIT, callback, now=now) == 0.0:
                breaker.record(CIRCUIT, False, callback, now=now)
    assert PROBING < 19 and breaker.failed(CIRCUIT, 19) and breaker.failed(CIRCUIT, 20)
    probed = []
    for _ in range(4):  # the host is back; 19 and 20 ask every cool-down
        now += 31
        for callback in (19, 20):
            if breaker.wait(CIRCUIT, callback, now=now) == 0.0:
                probed.append(callback)
                breaker.record(CIRCUIT, True, callback, now=now)
    assert probed[:1] in ([19], [20])
    assert breaker.wait(CIRCUIT, 20, now=now) == 0.0  # closed
