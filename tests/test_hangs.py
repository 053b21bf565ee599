"""Hang attribution from faulthandler dumps (pure parsing; the e2e case is in test_elastic)."""

from phalanx.orchestrator.hangs import attribute, main_thread_frames

DUMP = '''Thread 0x00007f1 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 324 in wait
  File "/repo/phalanx/launch/worker.py", line 40 in _heartbeat

Current thread 0x00007f2 (most recent call first):
  File "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 2800 in all_reduce
  File "/repo/phalanx/parallel/trainer_base.py", line 81 in _agree
  File "/repo/phalanx/parallel/data_parallel.py", line 99 in train_step

'''


def test_main_thread_is_the_current_thread_block():
    frames = main_thread_frames("noise\n" + DUMP)
    assert frames[0].endswith("distributed_c10d.py:2800 all_reduce")
    assert frames[1].endswith("trainer_base.py:81 _agree") and len(frames) == 3


def test_the_rank_outside_torch_is_blamed():
    stuck = ["/repo/phalanx/launch/worker.py:118 before_step"]
    waiting = main_thread_frames(DUMP)
    odd, why = attribute({0: waiting, 1: stuck, 2: waiting})
    assert odd == [1] and "rank 1 in worker.py:118 before_step" in why


def test_minority_frame_is_blamed_when_all_wait_in_torch():
    a = ["/v/site-packages/torch/distributed/c10d.py:1 recv"]
    b = ["/v/site-packages/torch/distributed/c10d.py:2 all_reduce"]
    assert attribute({0: b, 1: b, 2: a})[0] == [2]
    assert attribute({0: a, 1: b})[0] == []  # a tie names nobody
