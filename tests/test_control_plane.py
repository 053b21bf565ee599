"""The control plane trusts only values signed with the run's token."""

import json

import pytest
import torch.distributed as dist

from phalanx.orchestrator.control_plane import ControlPlane


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def test_signed_round_trip_and_generation_prefix(store):
    cp = ControlPlane(store, token="secret", generation=3)
    cp.set("plan", {"world": 4})
    assert cp.get("plan") == {"world": 4}
    assert store.check(["g3/plan"]) and not store.check(["g0/plan"])
    cp.delete("plan")
    assert cp.get("plan") is None


def test_unsigned_forged_and_replayed_values_are_ignored(store):
    cp = ControlPlane(store, token="secret", generation=0)
    store.set("g0/stop", json.dumps({"v": "{}", "sig": "00" * 32}))  # forged
    store.set("g0/raw", b"not json")  # unsigned
    ControlPlane(store, token="other", generation=0).set("plan", {"x": 1})  # wrong token
    # A value signed for generation 0 copied under generation 1's prefix must not verify.
    cp.set("hb/0", {"t": 1})
    store.set("g1/hb/0", store.get("g0/hb/0"))
    assert cp.get("stop") is None and cp.get("raw") is None and cp.get("plan") is None
    assert ControlPlane(store, token="secret", generation=1).get("hb/0") is None
    assert set(cp.rejected) == {"g0/stop", "g0/raw", "g0/plan"}


def test_wait_times_out_with_the_key_named(store):
    cp = ControlPlane(store, token="secret", generation=0)
    with pytest.raises(TimeoutError, match="g0/plan"):
        cp.wait("plan", timeout_s=0.2)


@pytest.mark.parametrize("raw", [
    json.dumps({"v": "{}", "sig": 5}),          # a signature that is not a string
    json.dumps({"v": 5, "sig": "00" * 32}),     # a payload that is not a string
    json.dumps({"v": "{}", "sig": "é" * 64}),   # non-ASCII: hmac.compare_digest raises on it
    json.dumps({"v": "{}"}), json.dumps([1, 2]), "null", "[" * 100_000, b"\xff\xfe\x00",
])
def test_any_bytes_a_client_writes_are_rejected_never_raised(store, raw):
    from phalanx.orchestrator import control_plane

    seen = []
    control_plane.set_reject_hook(lambda key, why: seen.append((key, why)))
    try:
        cp = ControlPlane(store, token="secret", generation=0)
        store.set("g0/commit/3", raw)
        assert cp.get("commit/3") is None and cp.get("commit/3") is None
    finally:
        control_plane.set_reject_hook(None)
    assert seen == [("g0/commit/3", "not a signed phalanx value")]  # reported once, not per read


def test_guard_puts_back_what_another_client_overwrote_or_deleted(store):
    from phalanx.orchestrator.guard import StoreGuard

    reports = []
    guard = StoreGuard("secret", lambda key, how: reports.append((key, how)), keep_commits=2)
    other = dist.TCPStore("127.0.0.1", store.port, is_master=False)  # a raw client, no token
    cp = ControlPlane(guard.wrap(store), token="secret", generation=0)
    cp.set("plan", {"world": 2})
    cp.set("plan", {"world": 4})  # the controller's own rewrite is not a forgery
    assert reports == [] and guard.audit(other) == 0
    forged = json.dumps({"v": json.dumps({"world": 99}), "sig": "00" * 32})
    other.set("g0/plan", forged)
    other.set("g0/commit/7", forged)  # ahead of the controller
    other.set("g0/stop", forged)      # a key the controller never wrote: nobody trusts it
    assert guard.audit(other) == 1 and cp.get("plan") == {"world": 4}
    other.delete_key("g0/plan")
    assert guard.audit(other) == 1 and cp.get("plan") == {"world": 4}
    cp.set("commit/7", {"t": 1})
    assert cp.get("commit/7") == {"t": 1}
    assert reports == [("g0/plan", "overwritten"), ("g0/plan", "deleted (time 2)"),
                       ("g0/commit/7", "written before the controller wrote it")]
    for step in (8, 9):  # only the newest keep_commits commits are watched
        cp.set(f"commit/{step}", {"t": step})
    other.set("g0/commit/7", forged)
    other.set("g0/commit/9", forged)
    assert guard.audit(other) == 1 and cp.get("commit/9") == {"t": 9}
    assert cp.get("commit/7") is None
